"""A literal transcription of what the authors' code computes, written here from the architecture
of akamaster's CIFAR ResNet and from ALGORITHM.md (no code of theirs), in their operation order:
modules as they build them, the in-place residual add, average pooling over a window as wide as
the feature map, and an update that loops over layers and centers with masked sums over whole
tensors. The tests hold resnet.py and utils.py to it.
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F


class Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class Block(nn.Module):
    def __init__(self, in_planes, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1,
                               bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = Lambda(lambda x: F.pad(x[:, :, ::2, ::2],
                                                   (0, 0, 0, 0, planes // 4, planes // 4),
                                                   "constant", 0))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        out = F.relu(out)
        return out


class ResNet(nn.Module):
    def __init__(self, blocks, pooling='window'):
        super().__init__()
        self.in_planes = 16
        self.pooling = pooling
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self.make_layer(16, blocks, 1)
        self.layer2 = self.make_layer(32, blocks, 2)
        self.layer3 = self.make_layer(64, blocks, 2)
        self.linear = nn.Linear(64, 10)

    def make_layer(self, planes, blocks, stride):
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(Block(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer1(out)
        out = self.layer2(out)
        out = self.layer3(out)
        if self.pooling == 'window':  # the authors'
            out = F.avg_pool2d(out, out.size()[3])
        else:  # what resnet.py used before: the same mean, summed in another order
            out = F.adaptive_avg_pool2d(out, 1)
        out = out.view(out.size(0), -1)
        return self.linear(out)


BLOCKS = {'resnet8': 1, 'resnet20': 3, 'resnet32': 5}


def build(arch, pooling='window'):
    return ResNet(BLOCKS[arch], pooling)


def quantize_layer(w, row, l1):
    """Q_c for one layer: by sign for two centers, else the first nearest center, by |w - c|
    with L1 and (w - c)^2 with L2."""
    if len(row) == 2:
        return (w < 0) * row[0] + (w >= 0) * row[1]
    distances = torch.stack([abs(w - row[k]) if l1 else (w - row[k]) ** 2
                             for k in range(len(row))])
    return row[torch.argmin(distances, 0)]


def update(model, names, centers, x, y, lr1, lr2, lam, lam2, l1):
    """Prox step then center step, layer by layer and center by center (ALGORITHM.md)."""
    n = centers.shape[1]
    params = dict(model.named_parameters())
    with torch.no_grad():
        for i, name in enumerate(names):
            p = params[name]
            pc = quantize_layer(p, centers[i], l1)
            t = lam * lr1
            if l1:
                if lr2 == 0:
                    a, s = torch.abs(p), torch.sign(p)
                    p.copy_(s * (torch.relu(torch.abs(a - 1) - t) * torch.sign(a - 1) + 1))
                else:
                    above, below = p > pc + t, p < pc - t
                    between = (p >= pc - t) & (p <= pc + t)
                    p.copy_((p - t) * above + (p + t) * below + pc * between)
                p.clamp_(-1, 1)
            else:
                p.copy_((p + 2 * lam * lr1 * pc) / (1 + 2 * lam * lr1))
    quantized = copy.deepcopy(model).train()
    qparams = dict(quantized.named_parameters())
    with torch.no_grad():
        for i, name in enumerate(names):
            qparams[name].copy_(quantize_layer(params[name], centers[i], l1))
    quantized.zero_grad()
    F.cross_entropy(quantized(x), y).backward()
    grads, members, pos, neg, sums = (torch.zeros_like(centers) for _ in range(5))
    with torch.no_grad():
        for i, name in enumerate(names):
            p, pc = params[name], qparams[name]
            for k in range(n):
                mine = pc == centers[i, k]
                grads[i, k] += torch.sum(mine * pc.grad)
                members[i, k] += torch.sum(mine)
                pos[i, k] += torch.sum(((p - pc) * mine) > 0)
                neg[i, k] += torch.sum(((p - pc) * mine) < 0)
                sums[i, k] += torch.sum(mine * p)
        if l1:
            centers += -(lr2 * torch.clamp(grads, -10, 10) + lam2 * lr2 * (pos - neg))
        else:
            centers += -lr2 * grads + 2 * lam2 * lr2 * sums
            centers /= 1 + 2 * lam2 * lr2 * members
        centers.copy_(torch.sort(centers).values)
    return members
