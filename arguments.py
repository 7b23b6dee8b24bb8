"""The one command-line configuration shared by train.py and test.py."""
import argparse
import os


def default_workers() -> int:
    return min(8, os.cpu_count() or 1)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each default once: not for flags that are off, have none, or state their default in the help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False) or '(default' in (action.help or ''):
            return action.help
        return super()._get_help_string(action)


def get_parser(several_settings: bool = False) -> argparse.ArgumentParser:
    """Return the argparse parser of train.py and test.py (every flag documented and used).

    With ``several_settings`` (test.py), --N and --K take several values: every (N, K) pair is evaluated.
    """
    p = argparse.ArgumentParser(
        description='GLoFA: global and local feature adaptors for few-shot classification.',
        formatter_class=HelpFormatter)

    g = p.add_argument_group('data and model')
    g.add_argument('--data_name', type=str, default='mini_imagenet',
                   help='dataset name; data is read from datasets/<data_name> unless --data_path is given')
    g.add_argument('--data_path', type=str, nargs='+', default=None,
                   help='dataset root holding images/ and split/{train,val,test}.csv, or tiered-ImageNet\'s '
                        '{split}_images.npz and {split}_labels.pkl (default: datasets/<data_name>); several roots '
                        'make one benchmark whose splits are the unions of theirs')
    g.add_argument('--task_mix', type=str, default='class', choices=['class', 'source'],
                   help='with several roots: class draws the N classes of an episode from all roots\' classes '
                        '(tasks that mix coarse and fine classes); source draws a root per episode, then N of its classes')
    g.add_argument('--network_name', type=str, default='resnet', choices=['resnet', 'convnet'],
                   help='backbone: resnet (ResNet-12, 640-d) or convnet (Conv-4, 64-d)')
    g.add_argument('--model_name', type=str, default='glofa', choices=['glofa'],
                   help='few-shot model (only glofa)')
    g.add_argument('--adaptor', type=str, default='both', choices=['both', 'task', 'class', 'none'],
                   help='ablation: which masks adapt the embedding (task: no class masks; class: no task '
                        'mask; none: ProtoNet-style baseline with normalised prototypes)')
    g.add_argument('--pretrained', type=str, default='pretrained_weights.pth',
                   help="encoder weights to start from (FEAT's Res12-pre.pth or con-pre.pth); 'none' trains from scratch")
    g.add_argument('--tau', type=float, default=1.0, help='temperature dividing the logits')
    g.add_argument('--delta', type=float, default=1.0, help='upper bound of the mask values')
    g.add_argument('--h_bias_init', type=float, default=None,
                   help='start the bias of h\'s last layer (both strengths) at this value, so that relu(h(S)) '
                        'starts above 0 and the adaptors get gradients (default: the reference initialisation)')

    g = p.add_argument_group('episodes')
    several = dict(nargs='+') if several_settings else {}
    g.add_argument('--N', type=int, default=5, **several,
                   help='classes per episode (way); test.py takes several values, e.g. --N 5 10')
    g.add_argument('--K', type=int, default=1, **several,
                   help='support images per class (shot); test.py takes several values, e.g. --K 1 5')
    g.add_argument('--Q', type=int, default=15, help='query images per class')
    g.add_argument('--n_training_episodes', type=int, default=10000, help='training episodes in all')
    g.add_argument('--n_validating_episodes', type=int, default=200, help='validation episodes at each validation')
    g.add_argument('--n_testing_episodes', type=int, default=10000, help='test episodes')
    g.add_argument('--episode_gap', type=int, default=200, help='training episodes between two validations')

    g = p.add_argument_group('optimisation')
    g.add_argument('--lr_network', type=float, default=0.0001, help='learning rate of the encoder')
    g.add_argument('--lr', type=float, default=0.01, help='learning rate of the set functions')
    g.add_argument('--point', type=int, nargs='+', default=[20, 30, 40],
                   help='MultiStepLR milestones, counted in validations')
    g.add_argument('--gamma', type=float, default=0.2, help='learning-rate factor at each milestone')
    g.add_argument('--wd', type=float, default=0.0005, help='weight decay')
    g.add_argument('--mo', type=float, default=0.9, help='Nesterov momentum')

    g = p.add_argument_group('running')
    g.add_argument('--device', type=str, default='auto', choices=['auto', 'cpu', 'cuda'],
                   help='auto: CUDA when present, else the CPU')
    g.add_argument('--devices', type=int, nargs='+', default=[0],
                   help='CUDA device ids; more than one wraps the encoder in DataParallel')
    g.add_argument('--n_workers', type=int, default=default_workers(),
                   help='DataLoader worker processes (0 loads in the main process)')
    g.add_argument('--seed', type=int, default=960402, help='seed of Python, NumPy, torch and the episode samplers')
    g.add_argument('--save_dir', type=str, default='saves',
                   help='root of trained_models/ and statistics/')
    g.add_argument('--model_path', type=str, default=None,
                   help='checkpoint that test.py evaluates (default: the best checkpoint train.py writes for these flags)')
    g.add_argument('--eval_mode', type=str, default='auto', choices=['auto', 'cached', 'episodic'],
                   help='cached: encode each image of the split once, then adapt per episode; '
                        'episodic: encode every episode anew as the reference does (same answers); '
                        'auto: whichever encodes fewer images, for validation and test alike')
    g.add_argument('--episode_batch', type=int, default=0,
                   help='cached evaluation: episodes computed at once (default 0: as many as a memory bound allows; '
                        'any value gives the same results)')
    g.add_argument('--json', type=str, default=None,
                   help='write the test figures (per setting: accuracy, CI, adaptor diagnostics) to this JSON file')
    g.add_argument('--resume', action='store_true',
                   help="continue training from the run's 'last' checkpoint when it exists")
    g.add_argument('--overwrite', action='store_true',
                   help="train.py: replace the files of a run with the same identity (finished or not) instead of stopping")
    g.add_argument('--amp', action='store_true',
                   help='CUDA only: autocast (bfloat16 where supported, else float16 with a grad scaler)')
    g.add_argument('--channels_last', action='store_true',
                   help='channels-last memory format for the encoder: the same numbers up to rounding, often faster')
    g.add_argument('--demo', type=str, nargs='?', const='coarse', default=None, choices=list(DEMO_PRESETS),
                   help='generate the small built-in dataset (datasets/demo) and use the demo preset: '
                        'Conv-4 from scratch, short schedule; explicit flags override the preset. --demo mixed '
                        'adds fine-grained classes (datasets/demo_fine) and trains on both roots, --task_mix class')
    g.add_argument('--flag_debug', action='store_true',
                   help='debug run: a few episodes of everything, to check that the pipeline runs')
    return p


# A short schedule for the built-in demo data (Conv-4 from scratch on a 2-core CPU).
DEMO_PRESET = dict(
    data_name='demo', network_name='convnet', pretrained='none',
    Q=10, lr_network=0.01, lr=0.01, point=[4, 6], gamma=0.2,
    n_training_episodes=300, episode_gap=50, n_validating_episodes=100, n_testing_episodes=1000,
)
# The mix-grained demo: the coarse demo plus a fine-grained root, classes drawn from both.
MIXED_DEMO_PRESET = dict(DEMO_PRESET, data_path=[os.path.join('datasets', 'demo'), os.path.join('datasets', 'demo_fine')],
                         task_mix='class')
DEMO_PRESETS = {'coarse': DEMO_PRESET, 'mixed': MIXED_DEMO_PRESET}
# A few episodes of everything, to check that the pipeline runs end to end.
DEBUG_PRESET = dict(n_training_episodes=10, episode_gap=5, n_validating_episodes=5, n_testing_episodes=10)


def parse_args(argv: list[str] = None, several_settings: bool = False) -> argparse.Namespace:
    """Parse the command line; --demo and --flag_debug change the defaults, explicit flags still win."""
    parser = get_parser(several_settings)
    args = parser.parse_args(argv)
    if args.demo or args.flag_debug:
        parser.set_defaults(**{**(DEMO_PRESETS[args.demo] if args.demo else {}),
                               **(DEBUG_PRESET if args.flag_debug else {})})
        args = parser.parse_args(argv)
    return args
