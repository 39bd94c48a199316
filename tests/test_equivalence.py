"""The vectorised update equals a literal reading of ALGORITHM.md, layer by layer and center by
center (minGPT-style equivalence tests).

The first test hands both the same state at every step (teacher forcing) over a random-label SGD
trajectory, for several n and both regularisers: such a trajectory is chaotic, so two runs that
sum in another order drift apart whatever they compute. The second runs whole Adam trajectories
with no teacher forcing, model included, against tests/literal_reference.py: they must agree bit
for bit.
"""

import pytest
import torch
import torch.nn.functional as F

import data
import literal_reference
import resnet
import utils
from conftest import MINI, PRETRAINED


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
        expected = literal_reference.update(literal, weights.names, literal_centers, x, y,
                                            lr1=0.1, lr2=1e-3, lam=1e-2, lam2=1e-2, l1=l1)
        assert torch.equal(members, expected), step
        assert torch.allclose(centers, literal_centers, rtol=0, atol=1e-6), step
        for name, p in literal.state_dict().items():
            assert torch.allclose(model.state_dict()[name], p, rtol=0, atol=1e-6), (step, name)


def real_batches(steps, batch):
    """`steps` batches of real CIFAR-10 training images when ../shared is there, else images
    whose pixels depend on their class (normalised as the scripts do)."""
    if MINI.exists():
        cifar = data.load_cifar10(MINI, 'cpu')
        images, labels = cifar['train_x'][:steps * batch], cifar['train_y'][:steps * batch]
    else:
        generator = torch.Generator().manual_seed(0)
        labels = torch.randint(0, 10, (steps * batch,), generator=generator)
        noise = torch.randint(0, 40, (steps * batch, 3, 32, 32), generator=generator)
        images = (labels.view(-1, 1, 1, 1) * 20 + noise).to(torch.uint8)
    return [(data.normalize(images[i * batch:(i + 1) * batch]), labels[i * batch:(i + 1) * batch])
            for i in range(steps)]


def warm_state(arch):
    """The authors' ResNet-20 checkpoint when ../shared is there, else a seeded initialisation:
    a warm start puts many weights near 0, where assignments flip most easily."""
    path = PRETRAINED / 'resnet20_fp_fpinit.pt'
    if arch == 'resnet20' and path.exists():
        return resnet.read_state_dict(path)
    torch.manual_seed(0)
    return resnet.build(arch).state_dict()


def adam_trajectory(model, update, batches, n, lr1=1e-2, lr2=1e-4, lam=1e-2):
    """Adam steps on the full-precision model, each followed by `update`, as the authors' loop
    runs them; returns the member counts of every step and the final centers."""
    model.train()
    weights = utils.QuantizedWeights(model)
    centers = utils.init_centers(weights, n, adam=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr1)
    members = []
    for x, y in batches:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        members.append(update(model, weights, centers, x, y, lr1=lr1, lr2=lr2, lam=lam, lam2=lam,
                              l1=True))
    return members, centers


def ours(model, weights, centers, x, y, **hyper):
    return utils.quped_update(weights, centers, x, y, **hyper)


def theirs(model, weights, centers, x, y, **hyper):
    return literal_reference.update(model, weights.names, centers, x, y, **hyper)


@pytest.mark.parametrize('arch', ['resnet20', 'resnet8'])
def test_adam_trajectory_equals_the_authors_literal_code_bit_for_bit(arch):
    """The issue's case: a warm-started ResNet-20, 1 bit, L1, Adam with centers -1/+1, lr1 1e-2,
    lambda 1e-2, batch 64, four steps; our model and update against the literal ones."""
    batches = real_batches(4, 64)
    state = warm_state(arch)
    runs = {}
    for name, model, update in (('ours', resnet.build(arch), ours),
                                ('theirs', literal_reference.build(arch), theirs),
                                ('old pooling', literal_reference.build(arch, 'adaptive'), theirs)):
        model.load_state_dict(state)
        members, centers = adam_trajectory(model, update, batches, n=2)
        runs[name] = members, centers, model.state_dict()
    (members, centers, final), (their_members, their_centers, their_final) = (
        runs['ours'], runs['theirs'])
    assert all(torch.equal(a, b) for a, b in zip(members, their_members))
    assert torch.equal(centers, their_centers)
    assert all(torch.equal(final[k], their_final[k]) for k in final)
    # the test can tell: the pooling resnet.py had before moves the same trajectory
    old_final = runs['old pooling'][2]
    assert any(not torch.equal(final[k], old_final[k]) for k in final)
