"""The vectorised update equals a literal reading of ALGORITHM.md, layer by layer and center by
center, on the states of a real training trajectory (minGPT-style equivalence test).

Each step hands both the same state (teacher forcing): a trajectory of random-label SGD is
chaotic, so two runs that differ by float32 rounding drift apart (about x2 per step) whatever
they compute.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

import resnet
import utils


def literal_quantize(w, c):
    if len(c) == 2:
        return torch.where(w < 0, c[0], c[1])
    return c[(w.unsqueeze(-1) - c).abs().argmin(-1)]


def literal_update(model, names, centers, x, y, lr1, lr2, lam, lam2, l1):
    params = dict(model.named_parameters())
    with torch.no_grad():
        for i, name in enumerate(names):
            w = params[name]
            q = literal_quantize(w, centers[i])
            if l1:
                t = lam * lr1
                w.copy_(torch.where(w > q + t, w - t, torch.where(w < q - t, w + t, q)))
                w.clamp_(-1, 1)
            else:
                w.copy_((w + 2 * lam * lr1 * q) / (1 + 2 * lam * lr1))
    quantized = copy.deepcopy(model).train()
    qparams = dict(quantized.named_parameters())
    with torch.no_grad():
        for i, name in enumerate(names):
            qparams[name].copy_(literal_quantize(params[name], centers[i]))
    F.cross_entropy(quantized(x), y).backward()
    new, members = centers.clone(), torch.zeros_like(centers)
    with torch.no_grad():
        for i, name in enumerate(names):
            w, q, g = params[name], qparams[name], qparams[name].grad
            for k in range(centers.shape[1]):
                mine = q == centers[i, k]
                members[i, k] = mine.sum()
                grad = g[mine].double().sum().float()
                if l1:
                    pos, neg = (w[mine] > q[mine]).sum(), (w[mine] < q[mine]).sum()
                    new[i, k] = centers[i, k] - lr2 * grad.clamp(-10, 10) - lam2 * lr2 * (pos - neg)
                else:
                    new[i, k] = ((centers[i, k] - lr2 * grad + 2 * lam2 * lr2 * w[mine].sum())
                                 / (1 + 2 * lam2 * lr2 * members[i, k]))
        centers.copy_(new.sort(dim=1).values)
    return members


@pytest.mark.parametrize('n, l1', [(2, True), (4, True), (2, False), (8, False)])
def test_vectorised_update_equals_the_literal_algorithm(n, l1):
    torch.manual_seed(n)
    model = resnet.build('resnet8')
    literal = resnet.build('resnet8')
    weights = utils.QuantizedWeights(model)
    centers = utils.init_centers(weights, n)
    literal_centers = centers.clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(8):
        x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        literal.load_state_dict(model.state_dict())
        literal_centers.copy_(centers)
        members = utils.quped_update(weights, centers, x, y, lr1=0.1, lr2=1e-3, lam=1e-2,
                                     lam2=1e-2, l1=l1)
        expected = literal_update(literal, weights.names, literal_centers, x, y, lr1=0.1,
                                  lr2=1e-3, lam=1e-2, lam2=1e-2, l1=l1)
        assert torch.equal(members, expected), step
        assert torch.allclose(centers, literal_centers, rtol=0, atol=1e-6), step
        for name, p in literal.state_dict().items():
            assert torch.allclose(model.state_dict()[name], p, rtol=0, atol=1e-6), (step, name)
