"""The vectorised update equals a literal reading of ALGORITHM.md, layer by layer and center by
center (minGPT-style equivalence tests).

The first test hands both the same state at every step (teacher forcing) over a random-label SGD
trajectory of ResNet-20, for several n and both regularisers, at one and two threads: members,
weights and centers must be equal bit for bit (the statistics are summed in torch.sum's order).
The others run whole Adam trajectories with no teacher forcing, model included, against
tests/literal_reference.py, on the authors' checkpoint and real images (skipped without
../shared) or on a seeded model and synthetic images: they must agree bit for bit.
"""

import pytest
import torch
import torch.nn.functional as F

import data
import literal_reference
import resnet
import utils
from conftest import MINI, PRETRAINED, needs


@pytest.mark.parametrize('threads', [1, 2])
@pytest.mark.parametrize('n, l1', [(2, True), (4, True), (2, False), (8, False)])
def test_vectorised_update_equals_the_literal_algorithm_bit_for_bit(n, l1, threads):
    """ResNet-20's largest layers (36,864 weights) are summed in two pieces from two threads
    up: the vectorised sums must follow torch.sum's order at either count."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        teacher_forced_steps(n, l1)
    finally:
        torch.set_num_threads(before)


def teacher_forced_steps(n, l1):
    torch.manual_seed(n)
    model = resnet.build('resnet20')
    literal = resnet.build('resnet20')
    weights = utils.QuantizedWeights(model)
    centers = utils.init_centers(weights, n)
    literal_centers = centers.clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(4):
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
        assert torch.equal(centers, literal_centers), step
        for name, p in literal.state_dict().items():
            assert torch.equal(model.state_dict()[name], p), (step, name)


def real_batches(steps, batch):
    """`steps` batches of real CIFAR-10 training images, normalised as the scripts do."""
    cifar = data.load_cifar10(MINI, 'cpu')
    images, labels = cifar['train_x'][:steps * batch], cifar['train_y'][:steps * batch]
    return batches_of(images, labels, steps, batch)


def synthetic_batches(steps, batch):
    """Images whose pixels depend on their class."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (steps * batch,), generator=generator)
    noise = torch.randint(0, 40, (steps * batch, 3, 32, 32), generator=generator)
    images = (labels.view(-1, 1, 1, 1) * 20 + noise).to(torch.uint8)
    return batches_of(images, labels, steps, batch)


def batches_of(images, labels, steps, batch):
    return [(data.normalize(images[i * batch:(i + 1) * batch]), labels[i * batch:(i + 1) * batch])
            for i in range(steps)]


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


def compare_with_the_literal_code(arch, state, batches):
    """Our model and update against the literal ones, and against the literal model with the
    pooling resnet.py used before (which must move the trajectory: the test can tell)."""
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
    old_final = runs['old pooling'][2]
    assert any(not torch.equal(final[k], old_final[k]) for k in final)


@needs(MINI)
@needs(PRETRAINED)
def test_adam_trajectory_from_the_authors_checkpoint_on_real_images_is_bit_exact():
    """The issue's case: the authors' ResNet-20 checkpoint, 1 bit, L1, Adam with centers -1/+1,
    lr1 1e-2, lambda 1e-2, batch 64, four steps on real images."""
    state = resnet.read_state_dict(PRETRAINED / 'resnet20_fp_fpinit.pt')
    compare_with_the_literal_code('resnet20', state, real_batches(4, 64))


def test_adam_trajectory_from_a_seeded_model_on_synthetic_images_is_bit_exact():
    torch.manual_seed(0)
    state = resnet.build('resnet8').state_dict()
    compare_with_the_literal_code('resnet8', state, synthetic_batches(4, 64))
