"""Few-shot evaluation shared by train.py, test.py and the scripts: per-episode accuracies of a model.

Two ways give the same answers: 'episodic' encodes every episode's images, as the reference does;
'cached' encodes each image of the split once and runs only the adaptors and logits per episode.
"""
from typing import Iterable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from dataloader import FewShotDataset, episode_loader, episode_sampler, image_loader, iterate
from models.glofa import GLoFA, query_targets
from networks import advance_forward_counters, forward_counters, set_forward_counters
from utils import autocast, to_device


def choose_eval_mode(mode: str, n_images: int, n_episodes: int, images_per_episode: int) -> str:
    """'auto': cached when encoding the split once costs fewer images than encoding every episode."""
    if mode != 'auto':
        return mode
    return 'cached' if n_images < n_episodes * images_per_episode else 'episodic'


@torch.no_grad()
def encode_split(encoder: nn.Module, dataset: FewShotDataset, device: torch.device, batch_size: int = 128,
                 n_workers: int = 0, amp: bool = False, channels_last: bool = False,
                 desc: Optional[str] = None) -> torch.Tensor:
    """Embeddings of every image of the split in eval mode, in order: (len(dataset), d) on ``device``."""
    encoder.eval()
    features = []
    loader = image_loader(dataset, batch_size, n_workers, pin_memory=device.type == 'cuda')
    with tqdm(iterate(loader), total=len(loader), desc=desc or f'encoding {dataset.split}', leave=False,
              unit='batch', disable=desc == '') as bar:
        for images, _ in bar:
            with autocast(device, amp):
                features.append(encoder(to_device(images, device, channels_last)).float())
    return torch.cat(features)


@torch.no_grad()
def evaluate(model: GLoFA, dataset: FewShotDataset, n_episodes: int, n_way: int, n_shot: int, n_query: int,
             device: torch.device, generator: Optional[torch.Generator] = None, mode: str = 'cached',
             n_workers: int = 0, amp: bool = False, channels_last: bool = False,
             desc: str = 'test') -> np.ndarray:
    """Accuracy of each of ``n_episodes`` episodes (values in [0, 1]) in eval mode.

    mode 'episodic' encodes each episode's images, as the reference does; 'cached' encodes every
    image of the split once and runs only the adaptors and logits per episode; 'auto' picks the one
    that encodes fewer images. Both draw the same episodes from ``generator`` and give the same
    answers. Either way the encoder's DropBlock counters advance by one per episode, as in the reference.
    """
    model.eval()
    n_per_class = n_shot + n_query
    sampler = episode_sampler(dataset, n_episodes, n_way, n_per_class, generator)
    mode = choose_eval_mode(mode, len(dataset), n_episodes, n_way * n_per_class)
    targets = query_targets(n_way, n_query, device)
    accuracies = np.empty(n_episodes)
    if mode == 'cached':
        counters = forward_counters(model.encoder)
        features = encode_split(model.encoder, dataset, device, n_workers=n_workers, amp=amp,
                                channels_last=channels_last, desc=f'encoding {dataset.split}')
        set_forward_counters(model.encoder, counters)
        advance_forward_counters(model.encoder, n_episodes)  # one pass per episode, as the reference counts
        episodes = sampler
    else:
        loader = episode_loader(dataset, sampler, n_workers, pin_memory=device.type == 'cuda')
        episodes = (images for images, _ in iterate(loader))
    with tqdm(episodes, total=n_episodes, desc=desc, leave=False, unit='ep') as bar:
        for i, episode in enumerate(bar):
            with autocast(device, amp):
                if mode == 'cached':
                    logits = model.logits_from_embeddings(features[episode.to(device)], n_way, n_shot)
                else:
                    logits = model(to_device(episode, device, channels_last), n_way, n_shot)
            accuracies[i] = (logits.argmax(dim=1) == targets).float().mean().item()
    return accuracies


PROTOTYPE_METRICS = ('cosine', 'euclidean')


@torch.no_grad()
def prototype_accuracies(features: torch.Tensor, episodes: Iterable[torch.Tensor], n_way: int,
                         n_shot: int) -> dict[str, np.ndarray]:
    """ProtoNet accuracy of each episode on cached embeddings, with two metrics.

    features: (n_images, d), the split's embeddings in dataset order (``encode_split``); each episode
    is an index tensor (N * (K + Q),) in shot-major order (``EpisodeSampler``). The prototype of class
    n is the mean of its K support embeddings; 'euclidean' logits are -||q - p_n||^2, 'cosine' ones
    cos(q, p_n). Returns {'cosine': (n_episodes,), 'euclidean': (n_episodes,)}, values in [0, 1].
    """
    correct = {metric: [] for metric in PROTOTYPE_METRICS}
    for episode in episodes:
        x = features[episode.to(features.device)].float()                   # (N*S, d)
        n_query = len(episode) // n_way - n_shot
        support, query = x[:n_way * n_shot], x[n_way * n_shot:]            # (N*K, d), (N*Q, d)
        prototypes = support.reshape(n_shot, n_way, -1).mean(dim=0)         # (N, d)
        targets = query_targets(n_way, n_query, x.device)                   # (N*Q,)
        logits = {'cosine': F.normalize(query, dim=1) @ F.normalize(prototypes, dim=1).t(),       # (N*Q, N)
                  'euclidean': -(query[:, None, :] - prototypes[None, :, :]).pow(2).sum(dim=2)}  # (N*Q, N)
        for metric in PROTOTYPE_METRICS:
            correct[metric].append((logits[metric].argmax(dim=1) == targets).float().mean().item())
    return {metric: np.asarray(values) for metric, values in correct.items()}
