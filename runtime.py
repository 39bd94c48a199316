"""Machinery the experiment scripts share: `--name=value` configuration checked against the
defaults' types, the errors that end a script and how (run_guarded), Ctrl-C and SIGTERM,
random-number states, evaluation, the time estimate, device choice and the CPU allocator
setting. The run folder itself is runs.py's."""
import ast
import ctypes
import ctypes.util
import os
import random
import signal
import sys
import threading
import time

import torch
import torch.nn.functional as F
import tqdm
from torch.func import functional_call

import data

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
INTERRUPTED = 130  # the shell's exit status for a Ctrl-C
TERMINATED = 143  # and for a SIGTERM
SWEEP_PIPE_ENV = 'QUPED_SWEEP_FD'  # sweep.py's pipe: a run stops (as on SIGTERM) once it closes


class ConfigError(Exception):
    """A hyperparameter or run folder the run cannot use; the message says what to do."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM during a run; the message names what was kept and how to continue."""

    def __init__(self, message, status=INTERRUPTED):
        super().__init__(message)
        self.status = status


class Terminated(KeyboardInterrupt):
    """A SIGTERM, handled as a Ctrl-C is (raise_terminated)."""


def stop_word(interrupt):
    return 'terminated' if isinstance(interrupt, Terminated) else 'interrupted'


def exit_status(interrupt):
    """The exit status for a KeyboardInterrupt: 143 for a SIGTERM, 130 for a Ctrl-C."""
    return TERMINATED if isinstance(interrupt, Terminated) else INTERRUPTED


def raise_terminated(signum, frame):
    raise Terminated


def handle_stop_signals():
    """Once the libraries are loaded (startup.py's handlers until then): Ctrl-C raises
    KeyboardInterrupt, SIGTERM its subclass Terminated, so that a script stops as it does on
    Ctrl-C, saying what it kept."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, raise_terminated)


def stop_with_sweep(fd):
    """SIGTERM this process once the pipe `fd`'s writing end closes, as it does the moment the
    sweep holding it ends in any way, killed outright included: the run stops, keeping its last
    completed round, instead of training on alone."""
    def watch():
        while os.read(fd, 1):
            pass
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=watch, daemon=True).start()


class Diverged(Exception):
    """The training loss or the centers became non-finite."""


# --- configuration ---------------------------------------------------------------------------

def hyperparameters(namespace):
    """The hyperparameters a script defines at its top: its public globals of plain types."""
    return {k: v for k, v in namespace.items()
            if not k.startswith('_') and isinstance(v, (bool, int, float, str, tuple))}


def script_defaults(path):
    """The hyperparameters at the top of the script `path` (those runtime.hyperparameters
    collects there: its public assignments of plain values before DEFAULTS), read from its
    source without importing it, for tools that must not import a script."""
    with open(path) as f:
        tree = ast.parse(f.read())
    defaults = {}
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)):
            continue
        name = node.targets[0].id
        if name == 'DEFAULTS':
            break
        try:
            value = ast.literal_eval(node.value)
        except ValueError:
            continue
        if not name.startswith('_') and isinstance(value, (bool, int, float, str, tuple)):
            defaults[name] = value
    return defaults


def describe_type(default):
    if isinstance(default, tuple):
        kinds = sorted({type(v).__name__ for v in default}) or ['value']
        return f"a tuple of {' or '.join(kinds)}s"
    return type(default).__name__


def coerce(default, value):
    """`value` as the default's type where that loses nothing (an int where a float is
    expected, a list or single item where a tuple is), else None."""
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, tuple):
        items = tuple(value) if isinstance(value, (list, tuple)) else (value,)
        kinds = {type(v) for v in default}
        if kinds == {float}:
            items = tuple(float(v) if type(v) is int else v for v in items)
        return items if not kinds or all(type(v) in kinds for v in items) else None
    return value if type(value) is type(default) else None


def parse_value(defaults, name, text):
    """`text` as a value of the default's type."""
    default = defaults[name]
    if isinstance(default, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
        if isinstance(default, float) and text.strip().lower() in ('nan', 'inf', '-inf'):
            value = float(text)  # a float, if not a usable one: the checks say why
    if isinstance(default, tuple) and isinstance(value, str) and ',' in text:
        value = tuple(v.strip() for v in text.strip('()[]').split(',') if v.strip())
    value = coerce(default, value)
    if value is None:
        example = (f"({','.join(map(str, default))})" if isinstance(default, tuple)
                   else default)
        raise ConfigError(f"--{name}={text} is not {describe_type(default)}: write it like the "
                          f"default, --{name}={example}.")
    return value


def usage(path, defaults):
    """The script's docstring and a table of its hyperparameters: name, default and the
    comment beside it at the top of the script."""
    with open(path) as f:
        source = f.read()
    comments, name = {}, None
    for line in source.splitlines():
        head, _, comment = line.partition('#')
        key = head.split('=')[0].strip()
        if '=' in head and key in defaults:
            name = key
            comments[name] = comment.strip()
        elif name and not head.strip() and comment and line.startswith(' '):
            comments[name] += ' ' + comment.strip()
        else:
            name = None
    doc = ast.get_docstring(ast.parse(source)) or ''
    width = max(map(len, defaults))
    rows = [f"  --{k:<{width}} = {defaults[k]!r}\n      {comments.get(k, '')}" for k in defaults]
    return (f"{doc}\n\nusage: python {os.path.basename(path)} [--name=value ...]\n\n"
            f"hyperparameters (default, meaning):\n" + '\n'.join(rows))


def parse_overrides(defaults, argv):
    """{name: value} from ['--name=value', ...], checked against the defaults."""
    overrides = {}
    for arg in argv:
        name, eq, text = arg.removeprefix('--').partition('=')
        if not arg.startswith('--') or not eq:
            raise ConfigError(f"cannot read argument {arg!r}: write overrides as --name=value, "
                              f"e.g. --{next(iter(defaults))}=...")
        if name not in defaults:
            raise ConfigError(f"unknown hyperparameter {name!r}. Valid names: "
                              f"{', '.join(defaults)}.")
        overrides[name] = parse_value(defaults, name, text)
    return overrides


MAX_SEED = 2 ** 62  # seeds are offset per client and model; torch takes them below 2**64


def check_run_name(results_dir, name):
    """A run folder's name is one path component, inside results_dir."""
    if not results_dir:
        raise ConfigError("results_dir is empty: give the folder that run folders go into, "
                          "e.g. --results_dir=Results.")
    if (not name or name in ('.', '..') or os.path.isabs(name) or '/' in name
            or os.sep in name or (os.altsep and os.altsep in name)):
        raise ConfigError(f"--run_name={name!r} is not a folder name: it must be one name, "
                          f"without '/', '..' or a leading '/', so that the run stays inside "
                          f"results_dir ({results_dir}).")


def common_problems(cfg):
    """What is wrong with the settings both scripts share: the data and results folders, the
    run's name, the seed."""
    problems = []
    if not cfg['data_root']:
        problems.append("data_root is empty: give the folder that holds (or will hold) "
                        "cifar-10-batches-py/, e.g. --data_root=data")
    try:
        if cfg['run_name']:
            check_run_name(cfg['results_dir'], cfg['run_name'])
        elif not cfg['results_dir']:
            check_run_name('', 'run')
    except ConfigError as e:
        problems.append(str(e).rstrip('.'))
    if not 0 <= cfg['seed'] < MAX_SEED:
        problems.append(f"seed={cfg['seed']}: give a seed from 0 to 2**62 - 1")
    return problems


# --- device, seeds, random states ------------------------------------------------------------

def keep_freed_memory():
    """Stop glibc from handing freed heap memory back to the kernel after every pass.

    A QuPeD iteration runs two forward/backward passes; with glibc's default thresholds the
    memory freed at the end of the second is returned to the kernel and faulted in again by the
    next step: 20,000 to 150,000 page faults per step, about 5 % of a QuPeD iteration on a
    2-core CPU (bench/step_time.py --glibc-defaults). Raising both thresholds (mmap to its
    32 MiB maximum, trim to 1 GiB) removes them; memory then stays at its peak. Setting the trim
    threshold alone is worse: it also turns off glibc's adaptive mmap threshold. Returns True
    where applied (glibc), False elsewhere.
    """
    name = ctypes.util.find_library('c')
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))


def select_device(requested):
    """torch.device for 'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or 'cuda:N'."""
    if requested == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(requested)
    except RuntimeError:
        device = None
    if device is None or device.type not in ('cpu', 'cuda'):
        raise ConfigError(f"device={requested!r} is not a device this code trains on: use "
                          f"'auto', 'cpu', 'cuda' or 'cuda:N'.")
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ConfigError(f"device={requested!r} was asked for but this machine has no usable "
                          f"CUDA GPU: use --device=cpu (or auto) to run on the CPU.")
    return device


def describe_device(device):
    if device.type == 'cuda':
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def prepare_device(device, tf32=False):
    """Process settings for a run on `device`: the allocator on CPU; on CUDA, float32 kernels
    (TF32 off, as the authors ran) unless `tf32` asks for TF32 convolutions and matmuls."""
    if device.type == 'cpu':
        keep_freed_memory()
    else:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32


def seed_everything(seed, device):
    """Same seed and device, same numbers: seed every generator and pick deterministic kernels."""
    random.seed(seed)
    torch.manual_seed(seed)
    if device.type == 'cuda':
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)


def device_generator(seed, device):
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def rng_states(generator):
    """Every random state a run draws from, for its checkpoint."""
    return {'generator': generator.get_state(), 'torch_rng': torch.get_rng_state(),
            'python_rng': random.getstate()}


def restore_rng_states(states, generator):
    generator.set_state(states['generator'])
    torch.set_rng_state(states['torch_rng'])
    random.setstate(states['python_rng'])


# --- evaluation ------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model, images, labels, params=None):
    """(mean loss, accuracy) in eval mode on uint8 images; `params` swaps in other weights (the
    quantized ones) while keeping the model's BatchNorm statistics, as the reference does
    (quirk 5)."""
    model.eval()
    loss = torch.zeros((), device=labels.device)
    correct = torch.zeros((), device=labels.device, dtype=torch.int64)
    for x, y in data.eval_batches(images, labels):
        out = model(x) if params is None else functional_call(model, params, (x,))
        loss += F.cross_entropy(out, y, reduction='sum')
        correct += (out.argmax(1) == y).sum()
    n = labels.shape[0]
    return loss.item() / n, correct.item() / n


# --- time ------------------------------------------------------------------------------------

def format_duration(seconds):
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Clock:
    """The time left, from the mean wall time of the epochs (or rounds) this process ran."""

    def __init__(self):
        self.start = time.perf_counter()
        self.ran = 0

    def tick(self):
        self.ran += 1

    def left(self, remaining):
        if remaining <= 0:
            return 'done'
        mean = (time.perf_counter() - self.start) / max(self.ran, 1)
        return f"eta {format_duration(mean * remaining)}"


# --- running ---------------------------------------------------------------------------------

PROGRESS_FORMAT = ('{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, '
                   '{rate_noinv_fmt}{postfix}]')


def progress(items, total, label, unit):
    """`items` as they come, with tqdm's bar (count, rate, time left) on stderr when `label` is
    given and stderr is a terminal; logs and CI output stay clean. The bar goes once done. The
    rate is always items a second (tqdm's default turns a slow one into seconds an item)."""
    return tqdm.tqdm(items, total=total, desc=label, unit=f' {unit}', leave=False,
                     disable=not label or not sys.stderr.isatty(), file=sys.stderr,
                     mininterval=0.5, bar_format=PROGRESS_FORMAT)


class OutputError(Exception):
    """The run could not write its outputs; the message says what was kept and what to do."""


def run_guarded(body, argv, errors, help_text=None):
    """body(argv), ending a bad input or any of `errors` with a one-paragraph message (exit
    status 2), and a Ctrl-C with one line (exit status 130); every file already written stays as
    it was. --help (or -h) prints help_text() instead."""
    if help_text is not None and any(arg in ('--help', '-h') for arg in argv):
        try:
            print(help_text(), flush=True)
        except BrokenPipeError:  # `--help | head`: the reader has gone, which is fine
            sys.stdout = open(os.devnull, 'w')
        return None
    handle_stop_signals()
    if os.environ.get(SWEEP_PIPE_ENV, '').isdigit():  # popped: not for processes this one starts
        stop_with_sweep(int(os.environ.pop(SWEEP_PIPE_ENV)))
    try:
        return body(argv)
    except Interrupted as e:
        print(str(e), file=sys.stderr)
        raise SystemExit(e.status)
    except KeyboardInterrupt as e:
        print(f"{stop_word(e)} before the run began: nothing was written.", file=sys.stderr)
        raise SystemExit(exit_status(e))
    except (ConfigError, Diverged, OutputError, *errors) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
