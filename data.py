"""CIFAR-10 resident on the training device as uint8, augmented there batch by batch.

Reads the standard python batches (`cifar-10-batches-py/data_batch_1..5`, `test_batch`),
downloading them with torchvision when absent. Any set in that format loads, a partial one such
as ../shared/data/cifar10-mini too (the full-set checksum is only checked on download). The
augmentation is the reference's (random crop 32 with zero padding 4, horizontal flip) done on
whole batches with index arithmetic, with no per-image PIL work and no worker processes.
"""
import functools
import os
import pickle

import torch

FOLDER = 'cifar-10-batches-py'
TRAIN_FILES = [f'data_batch_{i}' for i in range(1, 6)]
TEST_FILES = ['test_batch']
URL = 'https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz'
MEAN = (0.4914, 0.4822, 0.4465)  # the reference's normalisation
STD = (0.2023, 0.1994, 0.2010)
PAD = 4


class DataError(Exception):
    """The data cannot be found, downloaded or read; the message says what to do."""


def batches_folder(root):
    """The folder holding the batch files: root/cifar-10-batches-py, or root itself."""
    nested = os.path.join(root, FOLDER)
    return nested if os.path.isdir(nested) or not os.path.isfile(
        os.path.join(root, TRAIN_FILES[0])) else root


def download(root, url):
    """Download and extract CIFAR-10 into root with torchvision (which checks its md5)."""
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import download_and_extract_archive
    os.makedirs(root, exist_ok=True)
    try:
        download_and_extract_archive(url, root, filename=CIFAR10.filename, md5=CIFAR10.tgz_md5)
    except Exception as e:  # URLError, HTTPError, timeouts, a bad checksum...
        raise DataError(
            f"CIFAR-10 is not in {os.path.abspath(root)!r} and could not be downloaded from {url} "
            f"({type(e).__name__}: {e}). On a machine with internet access, download that file "
            f"and extract it into the data folder (tar xzf cifar-10-python.tar.gz -C {root}), so "
            f"that {os.path.join(root, FOLDER, TRAIN_FILES[0])} exists; or point --data_root at a "
            f"folder that holds {FOLDER}/.") from None


def read_batch(path):
    """(images uint8 [N, 3, 32, 32], labels int64 [N]) from one python batch file."""
    try:
        with open(path, 'rb') as f:
            batch = pickle.load(f, encoding='latin1')
        images = torch.as_tensor(batch['data'])
        labels = torch.as_tensor(batch['labels'], dtype=torch.int64)
    except Exception as e:
        raise DataError(f"{path} is not a readable CIFAR-10 batch ({type(e).__name__}: {e}); "
                        f"replace it with the file from {URL}.") from None
    n = labels.shape[0]
    if (images.dtype != torch.uint8 or images.shape != (n, 3072) or n == 0
            or labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{path} is malformed: expected 'data' uint8 [N, 3072] and N 'labels' in "
                        f"0..9, found {images.dtype} {tuple(images.shape)} and {n} labels; "
                        f"replace it with the file from {URL}.")
    return images.view(n, 3, 32, 32), labels


def load_cifar10(root, device, url=None):
    """{'train_x', 'train_y', 'test_x', 'test_y'} on `device`, images as uint8; downloads from
    `url` (default URL) when root holds no batches."""
    if os.path.exists(root) and not os.path.isdir(root):
        raise DataError(f"data_root {os.fspath(root)!r} is a file, not a folder: point --data_root "
                        f"at the folder that holds {FOLDER}/, or at a new or empty folder to "
                        f"download CIFAR-10 into.")
    folder = batches_folder(root)
    names = TRAIN_FILES + TEST_FILES
    present = [name for name in names if os.path.isfile(os.path.join(folder, name))]
    if not present:
        download(root, url or URL)
        folder = batches_folder(root)
    elif len(present) < len(names):
        missing = [name for name in names if name not in present]
        raise DataError(f"{folder} lacks {', '.join(missing)}: the CIFAR-10 batches there are "
                        f"incomplete. Restore those files, or delete the folder to download the "
                        f"whole set again.")
    train = [read_batch(os.path.join(folder, name)) for name in TRAIN_FILES]
    test = [read_batch(os.path.join(folder, name)) for name in TEST_FILES]
    return {'train_x': torch.cat([x for x, _ in train]).to(device),
            'train_y': torch.cat([y for _, y in train]).to(device),
            'test_x': torch.cat([x for x, _ in test]).to(device),
            'test_y': torch.cat([y for _, y in test]).to(device)}


@functools.lru_cache
def channel_stats(device):
    """MEAN and STD as [1, 3, 1, 1] tensors on `device`, made once: building them per batch
    would copy from the host, and wait for it, at every step on a GPU."""
    return (torch.tensor(MEAN, device=device).view(1, 3, 1, 1),
            torch.tensor(STD, device=device).view(1, 3, 1, 1))


def normalize(images):
    """uint8 [B, 3, 32, 32] -> float, scaled to [0, 1] and standardised per channel."""
    mean, std = channel_stats(images.device)
    return (images.float() / 255 - mean) / std


def augment(images, generator):
    """Random crop 32 from the image zero-padded by 4, then a random horizontal flip, per image.

    One gather for the whole batch: row r of crop b is padded row dy_b + r; column c is padded
    column dx_b + c, or dx_b + 31 - c when the image is flipped.
    """
    b, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (PAD, PAD, PAD, PAD))
    dy = torch.randint(0, 2 * PAD + 1, (b, 1), device=images.device, generator=generator)
    dx = torch.randint(0, 2 * PAD + 1, (b, 1), device=images.device, generator=generator)
    flip = torch.rand(b, 1, device=images.device, generator=generator) < 0.5
    rows = dy + torch.arange(h, device=images.device)
    cols = torch.arange(w, device=images.device)
    cols = dx + torch.where(flip, w - 1 - cols, cols)
    batch = torch.arange(b, device=images.device).view(b, 1, 1, 1)
    channel = torch.arange(3, device=images.device).view(1, 3, 1, 1)
    return padded[batch, channel, rows.view(b, 1, h, 1), cols.view(b, 1, 1, w)]


def train_batches(data, batch_size, generator):
    """One epoch of (normalised augmented images, labels), shuffled with randperm. The last
    batch is partial, as with the reference's DataLoader, except that a final batch of a single
    image is dropped: BatchNorm cannot train on it."""
    n = data['train_y'].shape[0]
    order = torch.randperm(n, device=data['train_y'].device, generator=generator)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        if idx.numel() < 2:
            break
        yield normalize(augment(data['train_x'][idx], generator)), data['train_y'][idx]


def eval_batches(images, labels, batch_size=1000):
    """(normalised images, labels) in order, without augmentation."""
    for start in range(0, labels.shape[0], batch_size):
        yield normalize(images[start:start + batch_size]), labels[start:start + batch_size]
