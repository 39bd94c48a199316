"""QuPeD's Algorithm 1 on any nn.Module: centers, the quantizer Q_c, the weight prox step and the
center step, computed as the authors' code computes them (../shared/reference/ALGORITHM.md), and
the knowledge-distillation loss of its federated hooks.

The quantized weights are gathered into one flat vector (`QuantizedWeights`), with a vector that
says which layer each weight belongs to. Every step is then a few tensor operations over all
layers and centers at once, with no host-device synchronisation. The quantized forward/backward
of the center step runs on a twin of the model (a copy made once), which shares the storage of
the model's full-precision parameters and holds the quantized weights Q_c(x) in a flat vector of
its own; the full-precision model's parameters, gradients and running statistics are never
touched.

This module imports no other module of this project.
"""
import copy
import itertools
import math

import torch
import torch.nn.functional as F

CENTER_GRAD_CLIP = 10.0  # the reference clips the *summed* center gradient (quirk 2)
TORCH_GRAIN = 32768  # at::internal::GRAIN_SIZE: torch.sum on the CPU splits larger tensors


def resnet_rule(model):
    """The names of the weights the reference quantizes in a ResNet: every 4-D parameter except
    the model's first parameter (every conv weight but `conv1.weight`)."""
    named = list(model.named_parameters())
    return [name for i, (name, p) in enumerate(named) if i > 0 and p.dim() == 4]


def cnet_rule(model, num_classes=10):
    """The reference's rule for its small CNNs (`cnet=True`): every parameter except the first,
    those of the final layer (first dimension `num_classes`) and the 1-D ones. Unlike the ResNet
    rule, fully connected weights are quantized too."""
    named = list(model.named_parameters())
    return [name for i, (name, p) in enumerate(named)
            if i > 0 and p.dim() > 1 and p.shape[0] != num_classes]


class QuantizedWeights:
    """The weights QuPeD quantizes, by default as the reference chooses them in a ResNet
    (`resnet_rule`); `names` picks any other set of parameters (e.g. `cnet_rule(model)`).

    Build it after the model is on its device: it keeps the layer index and the twin there.
    """

    def __init__(self, model, names=None):
        params = dict(model.named_parameters())
        self.model = model
        self.names = list(resnet_rule(model) if names is None else names)
        unknown = [name for name in self.names if name not in params]
        if unknown:
            raise ValueError(f"{', '.join(unknown)}: not parameters of the model, so they cannot "
                             f"be quantized; name parameters from model.named_parameters().")
        if not self.names:
            raise ValueError("no weights to quantize: the ResNet rule quantizes the 4-D weights "
                             "after the first parameter, and this model has none; pass `names`.")
        self.params = [params[name] for name in self.names]
        self.shapes = [p.shape for p in self.params]
        self.numels = [p.numel() for p in self.params]
        ends = list(itertools.accumulate(self.numels))
        self.bounds = list(zip([0] + ends[:-1], ends))  # each layer's slice of the flat vector
        device = self.params[0].device
        self.layer = torch.repeat_interleave(torch.arange(len(self.names), device=device),
                                             torch.tensor(self.numels, device=device))
        # The center step's forward runs in training mode on a twin of the model: BatchNorm's
        # running statistics there are scratch, never the model's. The twin shares the storage
        # of every full-precision parameter (so it always sees the model's current values) and
        # holds its quantized weights as views of one flat vector, which Q_c(x) is written to.
        self.twin = copy.deepcopy(model)
        self.twin_flat = torch.empty(sum(self.numels), device=device, dtype=self.params[0].dtype)
        twin_params = dict(self.twin.named_parameters())
        quantized = set(self.names)
        for name, p in params.items():
            twin_params[name].requires_grad_(name in quantized)
            if name not in quantized:
                twin_params[name].data = p.data
        self.twin_quantized = [twin_params[name] for name in self.names]
        for twin_p, chunk in zip(self.twin_quantized, self.twin_flat.split(self.numels)):
            twin_p.data = chunk.view_as(twin_p)

    def __len__(self):
        return len(self.names)

    def flat(self):
        """The current weights as one flat vector (a copy)."""
        return torch.cat([p.detach().reshape(-1) for p in self.params])

    def unflatten(self, flat):
        """{name: view of `flat` shaped as that layer's weight}."""
        return {name: chunk.view(shape) for name, chunk, shape
                in zip(self.names, flat.split(self.numels), self.shapes)}

    @torch.no_grad()
    def write(self, flat):
        """Copy a flat vector back into the model's weights."""
        for p, chunk in zip(self.params, flat.split(self.numels)):
            p.copy_(chunk.view_as(p))


def reduction_chunks(numel, threads):
    """The [start, end) pieces that torch.sum on the CPU adds separately and then in order, for
    a contiguous tensor of `numel` elements summed with `threads` threads: one piece below
    TORCH_GRAIN elements or on one thread, else min(threads, ceil(numel / TORCH_GRAIN)) pieces of
    ceil(numel / pieces) elements (ATen's two-pass reduction). The reference sums every statistic
    with torch.sum, so its last bits depend on its thread count; summing the same pieces
    reproduces them on any thread count (tests/test_utils.py checks torch.sum against it)."""
    if numel < TORCH_GRAIN or threads <= 1:
        return [(0, numel)]
    pieces = min(threads, math.ceil(numel / TORCH_GRAIN))
    size = math.ceil(numel / pieces)
    return [(start, min(start + size, numel)) for start in range(0, numel, size)]


def default_threads(device):
    """The thread count whose torch.sum order the statistics reproduce: this process's on the
    CPU (as the reference would sum here); on CUDA the order is the GPU's own, so 1."""
    return torch.get_num_threads() if torch.device(device).type == 'cpu' else 1


def masked_sums(values, masks, threads):
    """sum(values * mask) for each mask, summed as torch.sum sums a whole masked layer (the
    reference's order): `values` [S, N], `masks` [K, N] bool; returns [S, K]."""
    masked = torch.where(masks, values.unsqueeze(1), 0)
    total = None
    for start, end in reduction_chunks(values.shape[-1], threads):
        part = masked[..., start:end].sum(-1)  # per-row sums equal torch.sum of each row
        total = part if total is None else total + part
    return total


def init_centers(weights, n_centroids, adam=False, threads=None):
    """Initial centers, a sorted [n_layers, n_centroids] tensor on the weights' device.

    n == 2: [mean of the negative weights, mean of the non-negative weights] per layer;
    n > 2: linspace(min, max, n) per layer. With `adam` (the reference's choice when the weight
    optimizer is Adam) the first and last center of every row are then set to -1 and +1.
    Runs once, so a loop over layers is fine here; the means are summed in the reference's
    order (`threads`: see center_step), so that its centers are reproduced to the last bit.
    """
    if n_centroids < 2:
        raise ValueError(f"n_centroids must be at least 2, got {n_centroids}.")
    device = weights.params[0].device
    threads = default_threads(device) if threads is None else threads
    rows = []
    for name, p in zip(weights.names, weights.params):
        w = p.detach().reshape(1, -1)
        if n_centroids == 2:
            signs = torch.cat([w < 0, w >= 0])
            sums = masked_sums(w, signs, threads)[0]
            low, high = (sums / signs.sum(1)).tolist()
        else:
            low, high = torch.min(w).item(), torch.max(w).item()
        rows.append(torch.linspace(low, high, n_centroids))
    centers = torch.stack(rows).to(device)
    if adam:
        centers[:, 0] = -1
        centers[:, -1] = 1
    bad = [name for name, row in zip(weights.names, centers) if not torch.isfinite(row).all()]
    if bad:
        raise ValueError(f"layers {', '.join(bad)} have no negative or no non-negative weights, so "
                         f"their n == 2 centers (means of each sign) are undefined; use adam=True "
                         f"(centers -1/+1) or more centers.")
    return centers


def assign(x, layer, centers, l1=True):
    """Index of the center each weight is quantized to: by sign for n == 2 (x < 0 -> 0,
    x >= 0 -> 1, even if both centers share a sign: quirk 3), else the nearest center, the first
    index winning ties: argmin of |x - c_k| with L1, of (x - c_k)^2 with L2, as the reference
    measures it (the same center but at float32 ties)."""
    if centers.shape[1] == 2:
        return (x >= 0).long()
    diff = x.unsqueeze(1) - centers[layer]
    return (diff.abs() if l1 else diff ** 2).argmin(dim=1)


def quantize(x, layer, centers, l1=True):
    """Q_c(x) for a flat weight vector and the center index of each weight."""
    idx = assign(x, layer, centers, l1)
    key = layer * centers.shape[1] + idx
    return centers.view(-1)[key], key


def quantized_state(weights, centers, l1=True):
    """{name: Q_c(weight)} for every quantized layer (new tensors)."""
    q, _ = quantize(weights.flat(), weights.layer, centers, l1)
    return weights.unflatten(q)


@torch.no_grad()
def hard_quantize_(weights, centers, l1=True):
    """x <- Q_c(x) in place (the reference does this once, at the freeze epoch)."""
    weights.write(quantize(weights.flat(), weights.layer, centers, l1)[0])


@torch.no_grad()
def prox_step(weights, centers, lr1, lam, l1=True, lr2=1.0):
    """The weight prox step, in place, towards q = Q_c(x) with t = lam * lr1.

    L1 (lr2 != 0): soft threshold towards q, then clamp to [-1, 1].
    L1 with lr2 == 0 (fixed centers +-1): ProxQuant's binary prox, then clamp to [-1, 1].
    L2: x <- (x + 2 lam lr1 q) / (1 + 2 lam lr1), no clamp.
    The expressions mirror the reference's, operation for operation.
    """
    x = weights.flat()
    t = lam * lr1
    if l1 and lr2 == 0:
        x_abs = torch.abs(x)
        x = torch.sign(x) * (torch.relu(torch.abs(x_abs - 1) - t) * torch.sign(x_abs - 1) + 1)
        x = x.clamp_(-1, 1)
    elif l1:
        q, _ = quantize(x, weights.layer, centers)
        x = torch.where(x > q + t, x - t, torch.where(x < q - t, x + t, q)).clamp_(-1, 1)
    else:
        q, _ = quantize(x, weights.layer, centers, l1=False)
        x = (x + 2 * lam * lr1 * q) / (1 + 2 * lam * lr1)
    weights.write(x)


def quantized_loss_grad(weights, q, x, y, loss_fn=F.cross_entropy):
    """(d loss / d q, logits) for the model run with quantized weights `q` (flat) on batch
    (x, y), in training mode (BatchNorm on batch statistics, with the full-precision affine
    parameters), through the twin; the logits are detached."""
    with torch.no_grad():
        weights.twin_flat.copy_(q)
    weights.twin.train()
    logits = weights.twin(x)
    grads = torch.autograd.grad(loss_fn(logits, y), weights.twin_quantized)
    return torch.cat([g.reshape(-1) for g in grads]), logits.detach()


def center_step(weights, centers, x, y, lr2, lam2, l1=True, center_reg_fix=False,
                loss_fn=F.cross_entropy, threads=None, pull=None):
    """The center step, in place on `centers`; returns the member counts [n_layers, n] and the
    quantized model's logits on `x` (detached), which the federated algorithm reuses.

    With q = Q_c(x) from the current weights, per layer and center k: g_k the sum of
    d loss / d q over its members, n_k their number, pos_k / neg_k how many have x > c_k / x < c_k,
    s_k the sum of their x. Then
      L1: c_k <- c_k - lr2 clip(g_k, +-10) - lam2 lr2 (pos_k - neg_k)   (quirk 1: the reference's
          sign; `center_reg_fix` uses the descent direction, + lam2 lr2 (pos_k - neg_k))
      L2: c_k <- (c_k - lr2 g_k + 2 lam2 lr2 s_k) / (1 + 2 lam2 lr2 n_k)
    and each row is sorted. Membership is `q == c_k`, as in the reference: centers that coincide
    share their members. `pull` = (lambda_p, target), a flat vector like the weights, adds
    lambda_p (q - target) to d loss / d q, as the released code's QuPeL branch does.

    The sums are taken as the reference takes them, torch.sum over each masked layer, in the
    order of `threads` threads (default_threads: this process's on the CPU). That order matters:
    the quantized network's gradient is so sensitive to the centers (a 1-ulp change of one
    center moved a summed gradient by 1e-2 in a ResNet-20, README "Faithfulness") that a
    last-bit difference in one step grows about 200-fold in each of the next.
    """
    w = weights.flat()
    q, _ = quantize(w, weights.layer, centers, l1)
    grad, logits = quantized_loss_grad(weights, q, x, y, loss_fn)
    if pull is not None:
        lambda_p, target = pull
        grad = grad + lambda_p * (q - target)
    threads = default_threads(w.device) if threads is None else threads
    with torch.no_grad():
        # Per layer and center, over the members q == c_k: the sums of the gradient, of 1 and
        # of the regulariser's term, sign(x - q) for L1 (it sums to pos - neg), x for L2 (s).
        stats = torch.stack([grad, torch.ones_like(w), torch.sign(w - q) if l1 else w])
        g, members, reg_sum = torch.stack(
            [masked_sums(stats[:, start:end], q[start:end] == row.unsqueeze(1), threads)
             for (start, end), row in zip(weights.bounds, centers)], dim=1)
        if l1:
            reg = lam2 * lr2 * reg_sum
            centers += -(lr2 * g.clamp(-CENTER_GRAD_CLIP, CENTER_GRAD_CLIP)
                         + (-reg if center_reg_fix else reg))
        else:
            centers += -lr2 * g + 2 * lam2 * lr2 * reg_sum
            centers /= 1 + 2 * lam2 * lr2 * members
        centers.copy_(centers.sort(dim=1).values)
    return members, logits


def quped_update(weights, centers, x, y, lr1, lr2, lam, lam2, l1=True, center_reg_fix=False,
                 loss_fn=F.cross_entropy, threads=None):
    """One QuPeD update after the weight optimizer's step: prox step, then center step on the
    same batch. Returns the center step's member counts."""
    prox_step(weights, centers, lr1, lam, l1=l1, lr2=lr2)
    members, _ = center_step(weights, centers, x, y, lr2, lam2, l1=l1,
                             center_reg_fix=center_reg_fix, loss_fn=loss_fn, threads=threads)
    return members


def kd_loss(student_logits, y, teacher_logits, lambda_p, temp, scale_student=False):
    """The knowledge-distillation loss of the released update_prox (ALGORITHM.md):

        (1 - lambda_p) CE(s, y) + lambda_p T^2 KL(log_softmax(s) || softmax(t / T))

    with the KL divergence per sample, averaged over the batch (KLDivLoss 'batchmean'). Only the
    teacher's logits are divided by T (quirk 8); `scale_student` divides the student's too, the
    usual form (Hinton et al.). lambda_p == 0 is plain cross-entropy, as in the reference.
    """
    ce = F.cross_entropy(student_logits, y)
    if lambda_p == 0:
        return ce
    student = student_logits / temp if scale_student else student_logits
    kl = F.kl_div(F.log_softmax(student, dim=1), F.softmax(teacher_logits / temp, dim=1),
                  reduction='batchmean')
    return (1 - lambda_p) * ce + lambda_p * temp ** 2 * kl
