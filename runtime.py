"""Process-level setup shared by the experiment and the benchmark: device choice, the CPU
allocator, seeding, and atomic file output."""
import ctypes
import ctypes.util
import io
import json
import os
import random
import tempfile

import torch

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


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
        raise ValueError(f"device={requested!r} is not a device: use 'auto', 'cpu' or 'cuda'.")
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f"device={requested!r} was asked for but this machine has no usable CUDA "
                         f"GPU: use --device=cpu (or auto) to run on the CPU.")
    return device


def seed_everything(seed, device):
    """Same seed and device, same numbers: seed every generator and pick deterministic kernels."""
    random.seed(seed)
    torch.manual_seed(seed)
    if device.type == 'cuda':
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)


def write_atomic(path, data):
    """Write bytes to `path` through a temporary file and a rename: a kill mid-write leaves the
    previous file intact."""
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or '.', prefix='.tmp-')
    try:
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; keep the usual mode
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
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
