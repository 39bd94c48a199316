"""CIFAR-10 models: ResNets (He et al. 2016, section 4.2) with option-A (parameter-free)
shortcuts, and two small CNNs for clients with few resources.

The same architecture and parameter names as akamaster/pytorch_resnet_cifar10 and the QuPeD
authors' `resnet.py` (`conv1.weight`, `bn1.*`, `layer1.0.conv1.weight`, ..., `linear.*`), so their
checkpoints load strictly. Depth 6n + 2, n blocks per stage:

    name       blocks per stage   parameters
    resnet8    1                      75,290
    resnet20   3                     269,722
    resnet32   5                     464,154
    resnet44   7                     658,586
    resnet56   9                     853,018
    resnet110  18                  1,727,962

(The authors' `resnet8` has `[1, 1, 0]` blocks and cannot run: its linear layer expects 64
features. Their golden vectors use `[1, 1, 1]`, as here.)

The QuPeD authors' code names two CNNs, `Cifarnet` and `Cifarnet2`, but never released them;
these are this project's, small and without BatchNorm:

    cifarnet    conv5x5 3->6, maxpool, conv5x5 6->16, maxpool, fc 400->120->84->10      62,006
    cifarnet2   conv3x3 3->16, maxpool, conv3x3 16->32, maxpool, conv3x3 32->64,
                maxpool, fc 1024->128->10                                            156,074

This module knows nothing of quantization.
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

# The authors' published full-precision checkpoints (github.com/kazkara/QuPeD).
PUBLISHED = {
    20: ('resnet20_fp_fpinit.pt', 'https://github.com/kazkara/QuPeD/raw/main/resnet20_fp_fpinit.pt',
         '3f093dcd89d47eaab18b897aee327d7cddb2cecc177430e9b54630ae9949fa88'),
    32: ('resnet32_fp_sgd1init.pt',
         'https://github.com/kazkara/QuPeD/raw/main/resnet32_fp_sgd1init.pt',
         '76e4f25e2f0a6dbc501e892c0682e5ee25741a503cf1f6136ed30b335c10e04d'),
}
PRETRAINED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'pretrained')


def default_pretrained_path(depth):
    """pretrained/<the authors' file> for ResNet-20/32, pretrained/resnet{depth}_fp.pt else."""
    name = PUBLISHED[depth][0] if depth in PUBLISHED else f"resnet{depth}_fp.pt"
    return os.path.join(PRETRAINED_DIR, name)


BLOCKS_PER_STAGE = {'resnet8': 1, 'resnet20': 3, 'resnet32': 5, 'resnet44': 7, 'resnet56': 9,
                    'resnet110': 18}


class ShortcutA(nn.Module):
    """Option A: subsample by 2 and zero-pad the new channels (no parameters)."""

    def __init__(self, extra_channels):
        super().__init__()
        self.extra_channels = extra_channels

    def forward(self, x):
        pad = self.extra_channels // 2
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, pad, pad))


class BasicBlock(nn.Module):
    def __init__(self, in_planes, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut = ShortcutA(planes - in_planes)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, blocks_per_stage, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._stage(16, 16, blocks_per_stage, stride=1)
        self.layer2 = self._stage(16, 32, blocks_per_stage, stride=2)
        self.layer3 = self._stage(32, 64, blocks_per_stage, stride=2)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    @staticmethod
    def _stage(in_planes, planes, blocks, stride):
        strides = [stride] + [1] * (blocks - 1)
        ins = [in_planes] + [planes] * (blocks - 1)
        return nn.Sequential(*[BasicBlock(i, planes, s) for i, s in zip(ins, strides)])

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        # The authors' pooling, a window as wide as the feature map: adaptive_avg_pool2d sums in
        # another order (last-bit differences that Adam amplifies), and its CUDA backward is
        # not deterministic.
        out = F.avg_pool2d(out, out.size(3))
        return self.linear(out.view(out.size(0), -1))


class Cifarnet(nn.Module):
    """LeNet-5's layout on 32x32 colour images."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x):
        out = F.max_pool2d(F.relu(self.conv1(x)), 2)
        out = F.max_pool2d(F.relu(self.conv2(out)), 2)
        out = F.relu(self.fc1(out.flatten(1)))
        return self.fc3(F.relu(self.fc2(out)))


class Cifarnet2(nn.Module):
    """Three 3x3 convolutions, each followed by 2x2 max pooling, then two fully connected
    layers."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 4 * 4, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x):
        out = F.max_pool2d(F.relu(self.conv1(x)), 2)
        out = F.max_pool2d(F.relu(self.conv2(out)), 2)
        out = F.max_pool2d(F.relu(self.conv3(out)), 2)
        return self.fc2(F.relu(self.fc1(out.flatten(1))))


CNNS = {'cifarnet': Cifarnet, 'cifarnet2': Cifarnet2}
ARCHS = list(BLOCKS_PER_STAGE) + list(CNNS)


def build(arch):
    """A freshly initialised `arch` ('resnet20', 'cifarnet', ...)."""
    if arch in CNNS:
        return CNNS[arch]()
    if arch not in BLOCKS_PER_STAGE:
        raise ValueError(f"unknown architecture {arch!r}: choose one of {', '.join(ARCHS)}")
    return ResNet(BLOCKS_PER_STAGE[arch])


def resnet8():
    return build('resnet8')


def resnet20():
    return build('resnet20')


def resnet32():
    return build('resnet32')


def resnet44():
    return build('resnet44')


def resnet56():
    return build('resnet56')


def resnet110():
    return build('resnet110')


class CheckpointError(Exception):
    """A checkpoint file that cannot be loaded into the requested model; the message says why."""


def read_checkpoint(path):
    """What `path` holds, loaded on the CPU without running code from it (weights_only)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise CheckpointError(f"{path!r} is a folder, not a checkpoint: name a file in it, e.g. "
                              f"{os.path.join(path, 'best_quantized.pt')} or "
                              f"{os.path.join(path, 'best.pt')}.")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist: check the path, or leave "
                              f"pretrained_path at its default to download the authors' file.")
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except PermissionError:
        raise CheckpointError(f"checkpoint {path!r} cannot be read: permission denied. Give this "
                              f"user read access to it (chmod u+r) and try again; the file "
                              f"itself may be fine.") from None
    except Exception as e:  # torch raises many types for a damaged file
        if 'Unsupported global' in str(e):
            raise CheckpointError(
                f"{path!r} holds Python objects beyond tensors and plain values, so it is not a "
                f"checkpoint of this project, which never runs code from a file: pass a "
                f"state_dict or one of the files the scripts write.") from None
        # torch's own advice (load with weights_only=False) is not for files this code reads:
        # keep its diagnosis only
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or ['']
        reason = lines[0]
        if 'Weights only load failed' in reason:
            after = [i for i, line in enumerate(lines) if 'Unpickler error' in line]
            reason = lines[after[0] + 1] if after and after[0] + 1 < len(lines) else 'unreadable'
        raise CheckpointError(f"checkpoint {path!r} could not be read ({type(e).__name__}: "
                              f"{reason}); the file is damaged or not a PyTorch checkpoint: "
                              f"delete it and download or re-create it.") from None


def read_state_dict(path):
    """The state_dict stored in `path`, on the CPU, whichever of the usual layouts it uses.

    Accepts a bare state_dict (the authors' files: PyTorch 1.5 legacy format, CUDA tensors), a
    dict wrapping it under 'state_dict' or 'model' (akamaster's, ours), and DataParallel's
    'module.' key prefix.
    """
    obj = read_checkpoint(path)
    for key in ('state_dict', 'model'):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise CheckpointError(f"checkpoint {os.fspath(path)!r} holds no state_dict (found "
                              f"{type(obj).__name__}); expected a state_dict, or a dict with one "
                              f"under 'state_dict' or 'model'.")
    return {k.removeprefix('module.'): v for k, v in obj.items()}


def guess_arch(state_dict):
    """The architecture a state_dict belongs to (a ResNet by its number of blocks), or None."""
    for arch, cnn in CNNS.items():
        if set(state_dict) == set(cnn().state_dict()):
            return arch
    blocks = {k.split('.')[1] for k in state_dict if k.startswith('layer1.')}
    return next((a for a, n in BLOCKS_PER_STAGE.items() if n == len(blocks)), None)


def fill_batch_counters(model, state):
    """`state` with the BatchNorm step counters it lacks set to 0, as BatchNorm itself fills
    them for checkpoints saved before PyTorch 0.4.1 had them (akamaster's, for one). Running
    statistics and every weight stay required."""
    missing = {f"{name}.num_batches_tracked" for name, module in model.named_modules()
               if isinstance(module, nn.modules.batchnorm._BatchNorm)
               and module.track_running_stats} - set(state)
    return {**state, **{key: torch.tensor(0, dtype=torch.long) for key in missing}}


def load_checkpoint(model, path, arch):
    """Load the weights in `path` into `model` (an `arch`), strictly, on the model's device."""
    state = fill_batch_counters(model, read_state_dict(path))
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
                   for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong_shape:
        found = guess_arch(state)
        problems = [f"{label}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                    f" ({len(keys)} in all)"
                    for label, keys in (('missing keys', missing), ('unexpected keys', unexpected),
                                        ('wrong shapes', wrong_shape)) if keys]
        raise CheckpointError(
            f"checkpoint {os.fspath(path)!r} does not fit {arch}: {'; '.join(problems)}."
            + (f" It looks like a {found} checkpoint: set resn to match it or choose another file."
               if found and found != arch else " Choose a checkpoint of this architecture."))
    model.load_state_dict(state)
