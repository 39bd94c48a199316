"""Machinery the experiment scripts share: `--name=value` configuration checked against the
defaults' types, run folders, atomic outputs and resume, random-number states, evaluation,
Ctrl-C, the time estimate, device choice and the CPU allocator setting."""
import ast
import ctypes
import ctypes.util
import io
import json
import os
import random
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call

import data

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
INTERRUPTED = 130  # the shell's exit status for a Ctrl-C


class ConfigError(Exception):
    """A hyperparameter or run folder the run cannot use; the message says what to do."""


class Interrupted(Exception):
    """Ctrl-C during a run; the message names what was kept and how to continue."""


class Diverged(Exception):
    """The training loss or the centers became non-finite."""


# --- configuration ---------------------------------------------------------------------------

def hyperparameters(namespace):
    """The hyperparameters a script defines at its top: its public globals of plain types."""
    return {k: v for k, v in namespace.items()
            if not k.startswith('_') and isinstance(v, (bool, int, float, str, tuple))}


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
    if isinstance(default, tuple) and isinstance(value, str) and ',' in text:
        value = tuple(v.strip() for v in text.strip('()[]').split(',') if v.strip())
    value = coerce(default, value)
    if value is None:
        example = (f"({','.join(map(str, default))})" if isinstance(default, tuple)
                   else default)
        raise ConfigError(f"--{name}={text} is not {describe_type(default)}: write it like the "
                          f"default, --{name}={example}.")
    return value


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
        raise ConfigError(f"device={requested!r} is not a device: use 'auto', 'cpu' or "
                          f"'cuda'.") from None
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


# --- outputs ---------------------------------------------------------------------------------

def write_atomic(path, data_bytes):
    """Write bytes to `path` through a temporary file and a rename: a kill mid-write leaves the
    previous file intact."""
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or '.', prefix='.tmp-')
    try:
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; keep the usual mode
        with os.fdopen(fd, 'wb') as f:
            f.write(data_bytes)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path, obj):
    write_atomic(path, (json.dumps(obj, indent=1) + '\n').encode())


def save_torch(path, obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_atomic(path, buffer.getvalue())


def new_run_folder(results_dir, name, script):
    """results_dir/name, created; a folder that already holds a run is never reused."""
    folder = os.path.join(results_dir, name)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ConfigError(f"{folder} is a file, not a run folder: choose another --run_name or "
                          f"--results_dir.")
    if os.path.isdir(folder) and os.listdir(folder):
        raise ConfigError(f"{folder} already holds a run; it is never overwritten. Choose another "
                          f"--run_name, or continue that run with: python {script} "
                          f"--resume={folder}")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the run folder {folder} ({e.strerror}): choose a "
                          f"writable --results_dir.") from None
    return folder


def write_rows(folder, rows, lists=None):
    """metrics.jsonl (one JSON object per row) and, for {filename: key} in `lists`, a JSON list
    of that key's values, each written atomically."""
    for filename, key in (lists or {}).items():
        values = json.dumps([row[key] for row in rows])
        write_atomic(os.path.join(folder, filename), values.encode())
    write_atomic(os.path.join(folder, 'metrics.jsonl'),
                 ''.join(json.dumps(row) + '\n' for row in rows).encode())


def read_resume(folder, overrides, resumable):
    """(configuration, last.pt's contents or None) of the run in `folder`. A run stopped before
    its first epoch ended has only config.json: it starts again from the beginning. Overrides
    other than `resumable` must match the saved configuration."""
    path = os.path.join(folder, 'last.pt')
    config_path = os.path.join(folder, 'config.json')
    if not os.path.isfile(path) and not os.path.isfile(config_path):
        raise ConfigError(f"--resume={folder}: no run there (neither last.pt nor config.json); "
                          f"name a folder that a run wrote.")
    checkpoint = None
    try:
        if os.path.isfile(path):
            checkpoint = torch.load(path, map_location='cpu', weights_only=True)
            cfg = dict(checkpoint['config'])
        else:
            with open(config_path) as f:
                cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in json.load(f).items()}
    except Exception as e:
        raise ConfigError(f"{path if checkpoint is None and os.path.isfile(path) else config_path}"
                          f" cannot be read ({type(e).__name__}); it is damaged. Start a new run "
                          f"instead.") from None
    changed = [f"{k} ({cfg.get(k)!r} -> {v!r})" for k, v in overrides.items()
               if k not in resumable and cfg.get(k) != v]
    if changed:
        raise ConfigError(f"a resumed run keeps its configuration, but these overrides differ "
                          f"from it: {', '.join(changed)}. Only {', '.join(sorted(resumable))} "
                          f"may change; start a new run for the others.")
    cfg.update({k: v for k, v in overrides.items() if k in resumable})
    cfg['resume'] = folder
    return cfg, checkpoint


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

def interrupted(folder, completed, unit, script):
    """The one-line message for a Ctrl-C: what is kept and the command that continues."""
    kept = (f"it keeps {unit}s 1-{completed}" if completed else f"no {unit} had ended yet")
    return Interrupted(f"interrupted: {folder} {kept}; continue with: python {script} "
                       f"--resume={folder}")


def train_loop(folder, rows, total, step, save, line, unit, script, lists=None):
    """Extend `rows` to `total` rows, row i being step(i). After each, save(rows) writes the
    checkpoints (last.pt last of them), then the logs and the stdout line follow, so that what a
    run shows is never ahead of what --resume continues from. Ctrl-C ends it with
    `Interrupted`, a non-finite loss with `Diverged`; the last completed row's outputs stay."""
    saved, clock = len(rows), Clock()
    try:
        for i in range(len(rows), total):
            try:
                row = step(i)
            except Diverged:
                raise Diverged(f"the training loss or the centers became non-finite in {unit} "
                               f"{i + 1}; the run stopped and {folder} keeps the outputs of "
                               f"{unit} {len(rows)}. Lower the learning rates or lambda_coef and "
                               f"start again.") from None
            rows.append(row)
            save(rows)
            saved = len(rows)
            write_rows(folder, rows, lists)
            clock.tick()
            print(line(row, total, clock.left(total - len(rows))), flush=True)
    except KeyboardInterrupt:
        raise interrupted(folder, saved, unit, script) from None
    return rows


def run_guarded(body, argv, errors):
    """body(argv), ending a bad input or any of `errors` with a one-paragraph message (exit
    status 2), and a Ctrl-C with one line (exit status 130); every file already written stays as
    it was."""
    try:
        return body(argv)
    except Interrupted as e:
        print(str(e), file=sys.stderr)
        raise SystemExit(INTERRUPTED)
    except KeyboardInterrupt:
        print("interrupted before the run began: nothing was written.", file=sys.stderr)
        raise SystemExit(INTERRUPTED)
    except (ConfigError, Diverged, *errors) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
