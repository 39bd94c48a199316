"""data.py: batch files that are wrong in ways a hand or a tool makes them, and data_root links
that lead nowhere, each a DataError that says what was found."""
import os
import pickle

import numpy as np
import pytest
import torch

import data
import main_centralized as mc
from conftest import NO_CUDA, exits_with_error


def rewrite_labels(path, labels):
    with open(path, 'rb') as f:
        batch = pickle.load(f, encoding='latin1')
    batch['labels'] = labels
    with open(path, 'wb') as f:
        pickle.dump(batch, f)


def test_fractional_labels_are_refused_not_truncated(cifar_root):
    path = cifar_root / 'cifar-10-batches-py' / 'data_batch_2'
    rewrite_labels(path, [3.5] + [1] * 39)
    with pytest.raises(data.DataError, match=r'data_batch_2 is not a readable CIFAR-10 batch.*'
                                             r'not whole numbers, e.g. 3.5'):
        data.load_cifar10(cifar_root, 'cpu')


def test_labels_out_of_range_are_shown_with_the_range_found(cifar_root):
    path = cifar_root / 'cifar-10-batches-py' / 'test_batch'
    rewrite_labels(path, list(np.arange(40) % 12))
    with pytest.raises(data.DataError, match='40 labels from 0 to 11'):
        data.load_cifar10(cifar_root, 'cpu')


@pytest.mark.parametrize('target', ['missing', 'loop'])
def test_a_data_root_link_that_leads_nowhere_is_named(tmp_path, capsys, target):
    link = tmp_path / 'data'
    os.symlink(tmp_path / 'missing' if target == 'missing' else link, link)
    exits_with_error(capsys, mc.main, [f'--data_root={link}', f'--results_dir={tmp_path}/r',
                                       '--resn=8', '--cold_start=True'],
                     'is a symbolic link that leads nowhere', '--data_root')
    assert not (tmp_path / 'r').exists()


# --- loading and augmentation --------------------------------------------------------------------

def test_loads_a_small_set_in_the_standard_format(cifar_root):
    cifar = data.load_cifar10(cifar_root, 'cpu')
    assert cifar['train_x'].shape == (200, 3, 32, 32) and cifar['train_x'].dtype == torch.uint8
    assert cifar['test_y'].shape == (40,)
    with open(cifar_root / 'cifar-10-batches-py' / 'data_batch_2', 'rb') as f:
        raw = pickle.load(f)
    assert torch.equal(cifar['train_x'][40:80].reshape(40, -1), torch.as_tensor(raw['data']))
    assert cifar['train_y'][40:80].tolist() == raw['labels']


def test_augmentation_keeps_labels_paired_and_crops_inside_the_padding():
    labels = torch.arange(64) % 10
    images = (labels + 1).to(torch.uint8).view(64, 1, 1, 1).expand(64, 3, 32, 32).contiguous()
    cifar = {'train_x': images, 'train_y': labels}
    generator = torch.Generator().manual_seed(0)
    offsets = set()
    for x, y in data.train_batches(cifar, 16, generator):
        raw = torch.round(x * torch.tensor(data.STD).view(1, 3, 1, 1) * 255
                          + torch.tensor(data.MEAN).view(1, 3, 1, 1) * 255)
        for image, label in zip(raw, y):
            inside = image != 0  # padding is zero; every image pixel is label + 1
            assert set(image[inside].tolist()) == {label.item() + 1}
            rows, cols = inside[0].any(1).nonzero(), inside[0].any(0).nonzero()
            assert len(rows) >= 28 and len(cols) >= 28  # at most 4 padded rows / columns
            assert inside[0].sum() == len(rows) * len(cols)  # one rectangle
            offsets.add((rows[0].item() - (32 - len(rows)), cols[0].item()))
    assert len(offsets) > 10  # the crops do vary


@pytest.mark.parametrize('device', [pytest.param('cuda', marks=NO_CUDA)])
def test_augmentation_on_the_device_equals_the_cpus(device):
    """The same crops and flips give the same pixels on the GPU; normalisation agrees to 4
    float32 ulps of its largest values (about 2.7), though IEEE division should give 0."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 32, 32), generator=generator, dtype=torch.uint8)
    dy, dx = (torch.randint(0, 9, (64, 1), generator=generator) for _ in range(2))
    flip = torch.rand(64, 1, generator=generator) < 0.5
    on_cpu = data.crop_and_flip(images, dy, dx, flip)
    on_device = data.crop_and_flip(images.to(device), dy.to(device), dx.to(device),
                                   flip.to(device))
    assert torch.equal(on_device.cpu(), on_cpu)
    assert torch.allclose(data.normalize(on_device).cpu(), data.normalize(on_cpu), rtol=0,
                          atol=1e-6)


def test_augmentation_flips_horizontally():
    image = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    image[..., :16] = 200  # left half bright
    seen = set()
    for seed in range(20):
        out = data.augment(image, torch.Generator().manual_seed(seed))
        seen.add(bool(out[0, 0, 16, 8] == 200))  # left-middle pixel: bright unless flipped
    assert seen == {True, False}
