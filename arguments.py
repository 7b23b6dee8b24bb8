"""The command lines of the entry points: the flags they share (one parent parser), then each one's own."""
import argparse
import copy
import math
import os
import sys
from typing import Optional
from base.console import UserError


# what each numeric flag accepts: (test, what the one-line refusal says it must be)
AT_LEAST_1 = (lambda v: v >= 1, 'at least 1')
AT_LEAST_0 = (lambda v: v >= 0, '0 or more')
POSITIVE = (lambda v: v > 0, 'positive')
FACTOR = (lambda v: 0 < v <= 1, 'in (0, 1]')
DOMAINS = {  # train.py and test.py (a flag of None is not checked: its default applies)
    'N': (lambda v: v >= 2, 'at least 2 (an episode of one class has nothing to tell apart)'),
    'K': AT_LEAST_1, 'Q': AT_LEAST_1, 'n_training_episodes': AT_LEAST_1, 'n_validating_episodes': AT_LEAST_1,
    'n_testing_episodes': AT_LEAST_1, 'episode_gap': AT_LEAST_1, 'point': AT_LEAST_1,
    'lr_network': AT_LEAST_0, 'lr': AT_LEAST_0, 'wd': AT_LEAST_0, 'gamma': FACTOR,
    'mo': (lambda v: 0 < v < 1, 'in (0, 1): Nesterov momentum needs a momentum above 0, and 1 or more diverges'),
    'tau': POSITIVE, 'delta': POSITIVE, 'temperature': POSITIVE, 'temperature2': POSITIVE, 'balance': AT_LEAST_0,
    'n_workers': AT_LEAST_0, 'episode_batch': AT_LEAST_0, 'seed': (lambda v: 0 <= v < 2 ** 63, 'from 0 to 2^63 - 1'),
    'h_bias_init': (lambda v: True, 'a number'),
}


def domain_error(args, domains: dict) -> Optional[str]:
    """'--mo must be in (0, 1) ..., got 1.5' for the first flag of ``domains`` outside its domain, else None."""
    for flag, (accepts, what) in domains.items():
        value = getattr(args, flag, None)
        for v in (value if isinstance(value, list) else [value]):
            if isinstance(v, float) and not math.isfinite(v):
                return f'--{flag} must be a finite number, {what}, got {v}'
            if v is not None and not accepts(v):
                return f'--{flag} must be {what}, got {v}'
    return None


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each default once: not for flags that are off, have none, or state their default in the help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False) or '(default' in (action.help or ''):
            return action.help
        return super()._get_help_string(action)


DEFAULT_WORKERS = min(8, os.cpu_count() or 1)  # --n_workers


def add_flags(parser: argparse.ArgumentParser, flags: dict, several: tuple = ()) -> argparse.ArgumentParser:
    """Add a table of flags ({group: {flag: add_argument's options}}); the ``several`` flags take several values."""
    for group, options in flags.items():
        g = parser.add_argument_group(group)
        for flag, kwargs in options.items():
            g.add_argument(flag, **kwargs, **({'nargs': '+'} if flag in several else {}))
    return parser


# The flags every entry point shares (train.py, test.py, pretrain.py), with one meaning and one help: the data, the
# network, how and where it runs, what to do with an existing run, the demo.
COMMON_FLAGS = {
    'data and network': {
        '--data_name': dict(default='mini_imagenet',
                            help='dataset name; data is read from datasets/<data_name> unless --data_path is given'),
        '--data_path': dict(nargs='+', default=None, help=(
            "dataset root holding images/ and split/{train,val,test}.csv, tiered-ImageNet's {split}_images.npz and "
            '{split}_labels.pkl, or the pickles of MetaOptNet / rfs, learn2learn or Ren et al. (docs/datasets.md; '
            'default: datasets/<data_name>); several roots make one benchmark whose splits are the unions of theirs')),
        '--task_mix': dict(default='class', choices=['class', 'source'], help=(
            "with several roots: class draws the N classes of an episode from all roots' classes (tasks that mix "
            'coarse and fine classes); source draws a root per episode, then N of its classes')),
        '--allow_overlap': dict(action='store_true', help=(
            'accept splits that share classes or images (refused otherwise: the accuracy would not be few-shot)')),
        '--network_name': dict(default='resnet', choices=['resnet', 'convnet'],
                               help='backbone: resnet (ResNet-12, 640-d) or convnet (Conv-4, 64-d)'),
        '--normalization': dict(default='imagenet', choices=['imagenet', 'feat'], help=(
            "the images' per-channel normalisation: imagenet (the reference's) or feat (the statistics FEAT's "
            'pretrained ResNet-12 was trained with)')),
    },
    'running': {
        '--device': dict(default='auto', choices=['auto', 'cpu', 'cuda'], help=(
            'auto: CUDA when present, else the CPU (under torchrun, process r uses GPU LOCAL_RANK)')),
        '--n_workers': dict(type=int, default=DEFAULT_WORKERS,
                            help='DataLoader worker processes (0 loads in the main process)'),
        '--seed': dict(type=int, default=960402, help='seed of Python, NumPy, torch and the samplers'),
        '--save_dir': dict(default='saves', help=(
            'root of the outputs: trained_models/ and statistics/ (train.py), pretrained/ (pretrain.py)')),
        '--resume': dict(action='store_true', help="continue the run's saved state (its 'last' file) when it exists"),
        '--overwrite': dict(action='store_true', help=(
            'replace the files of a run with the same identity (finished or not) instead of stopping')),
        '--amp': dict(action='store_true',
                      help='CUDA only: autocast (bfloat16 where supported, else float16 with a grad scaler)'),
        '--tensorboard': dict(action='store_true', help=(
            'train.py and pretrain.py: also write the scalars of the JSON log (losses, accuracies, learning rates, '
            'strengths) for TensorBoard under <save_dir>/tensorboard/<run>; needs the tensorboard package')),
        '--channels_last': dict(action='store_true', help=(
            'channels-last memory format for the encoder: the same numbers up to rounding, often faster')),
        '--demo': dict(nargs='?', const='coarse', default=None, choices=['coarse', 'mixed'], help=(
            'generate the small built-in dataset (datasets/demo) and use the demo preset: Conv-4, short schedule; '
            'explicit flags override the preset. --demo mixed adds fine-grained classes (datasets/demo_fine) and '
            'uses both roots, --task_mix class')),
    },
}


def common_parser() -> argparse.ArgumentParser:
    return add_flags(argparse.ArgumentParser(add_help=False), COMMON_FLAGS)


# each model's own flags; giving another model's flag is refused
MODEL_FLAGS = {'glofa': ('adaptor', 'tau', 'delta', 'h_bias_init', 'strengths'),
               'protonet': ('metric', 'temperature'),
               'feat': ('metric', 'temperature', 'temperature2', 'balance')}


# The flags of train.py and test.py beside the shared ones
FLAGS = {
    'model': {
        '--model_name': dict(default='glofa', choices=list(MODEL_FLAGS), help=(
            'few-shot model: glofa, or the baselines protonet and feat on the same encoder and protocol')),
        '--pretrained': dict(default='pretrained_weights.pth', help=(
            "encoder weights to start from (FEAT's Res12-pre.pth or con-pre.pth); 'none' trains from scratch")),
    },
    'model: glofa': {
        '--adaptor': dict(default='both', choices=['both', 'task', 'class', 'none'], help=(
            'ablation: which masks adapt the embedding (task: no class masks; class: no task mask; none: '
            'ProtoNet-style baseline with normalised prototypes)')),
        '--tau': dict(type=float, default=1.0, help='temperature dividing the logits'),
        '--delta': dict(type=float, default=1.0, help='upper bound of the mask values'),
        '--strengths': dict(default='reference', choices=['reference', 'constant', 'mix', 'mix-direction'], help=(
            "how the two strengths are made: reference, the method's relu(h(S)); constant, both held at 1 with h "
            'unused (the masks alone); mix, sigmoid(h(S)), between no adaptation and the constant\'s; mix-direction, '
            "mix learning only from the logits' direction, not their size (the same logits)")),
        '--h_bias_init': dict(type=float, default=None, help=(
            "start the bias of h's last layer (both strengths) at this value, so that relu(h(S)) starts above 0 and "
            'the adaptors get gradients (default: the reference initialisation)')),
    },
    'model: protonet and feat': {
        '--metric': dict(default='euclidean', choices=['euclidean', 'cosine'],
                         help='distance of queries to (adapted) prototypes'),
        '--temperature': dict(type=float, default=64.0,
                              help="temperature dividing the logits (64: FEAT's ResNet-12 commands)"),
        '--temperature2': dict(type=float, default=None, help=(
            "feat: temperature of the contrastive regulariser (default: FEAT's ResNet-12 value for the shot, 64 for "
            '1-shot, 32 otherwise)')),
        '--balance': dict(type=float, default=None, help=(
            "feat: weight of the contrastive regulariser in the loss (default: FEAT's ResNet-12 value for the shot, "
            '0.01 for 1-shot, 0.1 otherwise)')),
    },
    'episodes': {
        '--N': dict(type=int, default=5,
                    help='classes per episode (way); test.py takes several values, e.g. --N 5 10'),
        '--K': dict(type=int, default=1,
                    help='support images per class (shot); test.py takes several values, e.g. --K 1 5'),
        '--Q': dict(type=int, default=15, help='query images per class'),
        '--n_training_episodes': dict(type=int, default=10000, help='training episodes in all'),
        '--n_validating_episodes': dict(type=int, default=200, help='validation episodes at each validation'),
        '--n_testing_episodes': dict(type=int, default=10000, help='test episodes'),
        '--episode_gap': dict(type=int, default=200, help='training episodes between two validations'),
    },
    'optimisation': {
        '--lr_network': dict(type=float, default=0.0001, help='learning rate of the encoder'),
        '--freeze_encoder': dict(action='store_true', help=(
            'meta-train the head alone: the encoder in eval mode (BatchNorm statistics fixed), no backward pass '
            "through it, no update (--lr_network 0 still normalises by each episode's batch statistics and moves "
            'the running ones)')),
        '--lr': dict(type=float, default=0.01, help=(
            "learning rate of the head: GLoFA's set functions, FEAT's attention layer (ProtoNet has none)")),
        '--point': dict(type=int, nargs='+', default=[20, 30, 40],
                        help='MultiStepLR milestones, counted in validations'),
        '--gamma': dict(type=float, default=0.2, help='learning-rate factor at each milestone'),
        '--wd': dict(type=float, default=0.0005, help='weight decay'),
        '--mo': dict(type=float, default=0.9, help='Nesterov momentum'),
    },
    'running: train.py and test.py': {
        '--devices': dict(type=int, nargs='+', default=[0],
                          help='CUDA device ids; more than one wraps the encoder in DataParallel'),
        '--model_path': dict(default=None, help=(
            'checkpoint that test.py evaluates (default: the best checkpoint train.py writes for these flags); with '
            '--model_name protonet, none evaluates the --pretrained encoder itself (the default when no ProtoNet '
            'run was trained with these flags)')),
        '--eval_mode': dict(default='auto', choices=['auto', 'cached', 'episodic'], help=(
            'cached: encode each image of the split once, then adapt per episode; episodic: encode every episode '
            'anew as the reference does (same answers); auto: whichever encodes fewer images, for validation and '
            'test alike')),
        '--episode_batch': dict(type=int, default=0, help=(
            'cached evaluation: episodes computed at once (default 0: as many as a memory bound allows; any value '
            'gives the same results)')),
        '--feature_cache': dict(default='on', choices=['on', 'off'], help=(
            "the test's cached evaluation stores the split's embeddings under <save_dir>/features, one file per "
            'checkpoint content, split files, transform and network; a later test of the same checkpoint reuses '
            'them (validations always encode: the weights change)')),
        '--json': dict(default=None, help=(
            'write the test figures (per setting: accuracy, CI, adaptor diagnostics) to this JSON file')),
        '--flag_debug': dict(action='store_true',
                             help='debug run: a few episodes of everything, to check that the pipeline runs'),
    },
}


def get_parser(several_settings: bool = False) -> argparse.ArgumentParser:
    """The parser of train.py and test.py; with ``several_settings`` (test.py) --N and --K take several values:
    every (N, K) pair is evaluated."""
    parser = argparse.ArgumentParser(description='GLoFA: global and local feature adaptors for few-shot '
                                                 'classification.', formatter_class=HelpFormatter,
                                     parents=[common_parser()])
    return add_flags(parser, FLAGS, several=('--N', '--K') if several_settings else ())


# The demo's roots: the coarse demo, and with it the fine-grained one for the mix-grained demo (harness.demo writes them).
DEMO_ROOTS = {'coarse': dict(data_name='demo'),
              'mixed': dict(data_path=[os.path.join('datasets', 'demo'), os.path.join('datasets', 'demo_fine')],
                            task_mix='class')}
# A short schedule for the built-in demo data (Conv-4 from scratch on a 2-core CPU).
DEMO_PRESET = dict(
    network_name='convnet', pretrained='none',
    Q=10, lr_network=0.01, lr=0.01, point=[4, 6], gamma=0.2,
    n_training_episodes=300, episode_gap=50, n_validating_episodes=100, n_testing_episodes=1000,
)
# A few episodes of everything, to check that the pipeline runs end to end.
DEBUG_PRESET = dict(n_training_episodes=10, episode_gap=5, n_validating_episodes=5, n_testing_episodes=10)


def parse_args(argv: Optional[list[str]] = None, several_settings: bool = False) -> argparse.Namespace:
    """Parse the command line; --demo and --flag_debug change the defaults, explicit flags still win."""
    parser = get_parser(several_settings)
    args = parser.parse_args(argv)
    if args.demo or args.flag_debug:
        preset = {}
        if args.demo:
            preset = {**DEMO_ROOTS[args.demo], **DEMO_PRESET}
        parser.set_defaults(**{**preset, **(DEBUG_PRESET if args.flag_debug else {})})
        args = parser.parse_args(argv)
    with_data_roots(args)
    args.given = given_flags(parser, sys.argv[1:] if argv is None else argv)
    for flag in sorted({f for flags in MODEL_FLAGS.values() for f in flags} - set(MODEL_FLAGS[args.model_name])):
        if getattr(args, flag) != parser.get_default(flag):
            owners = ' and '.join(m for m, flags in MODEL_FLAGS.items() if flag in flags)
            parser.error(f'--{flag} is a flag of --model_name {owners}, not of {args.model_name}')
    return args


def with_data_roots(args) -> argparse.Namespace:
    """``args.data_path`` as the list of dataset roots: --data_path, else datasets/<data_name>."""
    if args.data_path is None:
        args.data_path = [os.path.join('datasets', args.data_name)]
    return args


def given_flags(parser: argparse.ArgumentParser, argv: list[str]) -> set:
    """The flags (their dest names) written on the command line ``argv``, not taken from a default or a preset;
    an abbreviation (--norm for --normalization) counts as argparse reads it."""
    options = parser._option_string_actions
    given = set()
    for token in argv:
        if token == '--':
            break
        if token.startswith('--'):
            name = token.split('=', 1)[0]
            matches = [options[name]] if name in options else [a for o, a in options.items() if o.startswith(name)]
            if len({a.dest for a in matches}) == 1:
                given.add(matches[0].dest)
    return given


def check_domains(args, domains: dict) -> None:
    """Refuse, in one line, the first flag of ``domains`` outside its domain (arguments.domain_error)."""
    error = domain_error(args, domains)
    if error:
        raise UserError(error)


def check_args(args, device) -> None:
    """Every numeric flag in its domain (arguments.DOMAINS), and what the device allows."""
    check_domains(args, DOMAINS)
    if getattr(args, 'freeze_encoder', False) and args.model_name == 'protonet':
        raise UserError('--freeze_encoder leaves ProtoNet nothing to train (it has no head parameters): evaluate the '
                        'encoder as it is with test.py --model_name protonet --pretrained FILE')
    if getattr(args, 'freeze_encoder', False) and args.pretrained.lower() == 'none':
        raise UserError('--freeze_encoder with --pretrained none would freeze a randomly initialised encoder: give '
                        '--pretrained FILE, or drop --freeze_encoder')
    if args.amp and device.type != 'cuda':
        raise UserError('--amp needs a CUDA device (this run is on the CPU)')


def with_setting(args, n_way: int, n_shot: int):
    """A copy of the flags with one (N, K) setting, for the helpers that read args.N and args.K."""
    view = copy.copy(args)
    view.N, view.K = n_way, n_shot
    return view
