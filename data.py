"""CIFAR-10 resident on the training device as uint8, augmented there batch by batch.

Reads the standard python batches (`cifar-10-batches-py/data_batch_1..5`, `test_batch`),
downloading them with torchvision when absent. Any set in that format loads, a partial one such
as ../shared/data/cifar10-mini too (the full-set checksum is only checked on download). The
augmentation is the reference's (random crop 32 with zero padding 4, horizontal flip) done on
whole batches with index arithmetic, with no per-image PIL work and no worker processes.
"""
import functools
import hashlib
import itertools
import math
import numbers
import os
import pickle

import numpy as np
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
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as e:
        raise DataError(f"data_root {os.fspath(root)!r} holds no CIFAR-10 and cannot be created "
                        f"to download it into ({e.strerror}): point --data_root at the folder "
                        f"that holds {FOLDER}/, or at a writable new one.") from None
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
        fractional = [v for v in batch['labels'] if not isinstance(v, numbers.Integral)]
        if fractional:
            raise ValueError(f"labels that are not whole numbers, e.g. {fractional[0]!r}")
        labels = torch.as_tensor(batch['labels'], dtype=torch.int64)
    except Exception as e:
        raise DataError(f"{path} is not a readable CIFAR-10 batch ({type(e).__name__}: {e}); "
                        f"replace it with the file from {URL}.") from None
    n = labels.shape[0]
    if (images.dtype != torch.uint8 or images.shape != (n, 3072) or n == 0
            or labels.min() < 0 or labels.max() > 9):
        found = f" from {labels.min().item()} to {labels.max().item()}" if n else ''
        raise DataError(f"{path} is malformed: expected 'data' uint8 [N, 3072] and N 'labels' in "
                        f"0..9, found {images.dtype} {tuple(images.shape)} and {n} labels{found}; "
                        f"replace it with the file from {URL}.")
    return images.view(n, 3, 32, 32), labels


def load_cifar10(root, device, url=None):
    """{'train_x', 'train_y', 'test_x', 'test_y'} on `device`, images as uint8; downloads from
    `url` (default URL) when root holds no batches."""
    if os.path.islink(root) and not os.path.exists(root):
        raise DataError(f"data_root {os.fspath(root)!r} is a symbolic link that leads nowhere (to "
                        f"{os.readlink(root)!r}: missing, or a loop of links): point --data_root "
                        f"at the folder that holds {FOLDER}/, or mend the link.")
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


def fingerprint(root):
    """{batch file: sha256} of the data in `root`: a resumed run may read its data from another
    folder only if this is unchanged."""
    folder = batches_folder(root)
    digests = {}
    for name in TRAIN_FILES + TEST_FILES:
        with open(os.path.join(folder, name), 'rb') as f:
            digests[name] = hashlib.file_digest(f, 'sha256').hexdigest()
    return digests


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
    """Random crop 32 from the image zero-padded by 4, then a random horizontal flip, per image
    (the offsets and flips drawn from `generator` on the images' device)."""
    b = images.shape[0]
    dy = torch.randint(0, 2 * PAD + 1, (b, 1), device=images.device, generator=generator)
    dx = torch.randint(0, 2 * PAD + 1, (b, 1), device=images.device, generator=generator)
    flip = torch.rand(b, 1, device=images.device, generator=generator) < 0.5
    return crop_and_flip(images, dy, dx, flip)


def crop_and_flip(images, dy, dx, flip):
    """Crop b at rows dy_b.. and columns dx_b.. of the image zero-padded by 4, flipped where
    flip_b; dy, dx, flip are [b, 1]. One gather for the whole batch: row r of crop b is padded
    row dy_b + r; column c is padded column dx_b + c, or dx_b + 31 - c when flipped."""
    b, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (PAD, PAD, PAD, PAD))
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


def batch_count(n, batch_size):
    """How many batches train_batches gives for n images (a last batch of one is dropped)."""
    return n // batch_size + (n % batch_size >= 2)


def eval_batches(images, labels, batch_size=1000):
    """(normalised images, labels) in order, without augmentation."""
    for start in range(0, labels.shape[0], batch_size):
        yield normalize(images[start:start + batch_size]), labels[start:start + batch_size]


# --- client partitions (federated runs) -------------------------------------------------------

NUM_CLASSES = 10


class PartitionError(Exception):
    """A partition the data cannot support; the message says which setting to change."""


def class_pools(labels, generator):
    """For each class, the indices of its images in a seeded random order."""
    return [idx[torch.randperm(idx.numel(), generator=generator)]
            for idx in (torch.nonzero(labels == k).flatten() for k in range(NUM_CLASSES))]


def pathological_partition(labels, n_clients, classes_per_client, seed, group_size=1):
    """Training indices per client (sorted). Clients come in groups of `group_size` consecutive
    clients that share one set of `classes_per_client` classes (a group holds one client per
    kind of model, so that kinds are compared on the same tasks); the groups' sets are drawn
    with the seed (draw_class_sets). Each class's images are split evenly among the clients
    that hold it."""
    if not 1 <= classes_per_client <= NUM_CLASSES:
        raise PartitionError(f"classes_per_client={classes_per_client}: a client holds 1 to "
                             f"{NUM_CLASSES} of CIFAR-10's classes.")
    generator = torch.Generator().manual_seed(seed)
    n_groups = math.ceil(n_clients / group_size)
    sets = draw_class_sets(n_groups, classes_per_client, generator)
    holders = [[] for _ in range(NUM_CLASSES)]
    for client in range(n_clients):
        for k in sets[client // group_size]:
            holders[k].append(client)
    parts = [[] for _ in range(n_clients)]
    for k, pool in enumerate(class_pools(labels.cpu(), generator)):
        if not holders[k]:
            continue
        if len(holders[k]) > pool.numel():
            raise PartitionError(
                f"class {k} has {pool.numel()} training images but {len(holders[k])} of the "
                f"{n_clients} clients hold it, so some would get none: lower n_clients or "
                f"classes_per_client.")
        for client, chunk in zip(holders[k], torch.tensor_split(pool, len(holders[k]))):
            parts[client].append(chunk)
    return [torch.sort(torch.cat(p)).values if p else torch.zeros(0, dtype=torch.long)
            for p in parts]


def draw_class_sets(n_groups, classes_per_set, generator):
    """`n_groups` sets of classes, each the first set, in the order of a seeded shuffle, among
    those of the least-held classes that no earlier group has (any set once all are taken): the
    classes stay as evenly held as the counts allow and no two groups share a set while there
    are sets to spare."""
    held, taken, sets = [0] * NUM_CLASSES, set(), []
    for _ in range(n_groups):
        shuffled = torch.randperm(NUM_CLASSES, generator=generator).tolist()
        ranked = sorted(shuffled, key=lambda k: held[k])  # stable: ties stay shuffled
        candidates = (tuple(sorted(c)) for c in itertools.combinations(ranked, classes_per_set))
        first = tuple(sorted(ranked[:classes_per_set]))
        chosen = next((c for c in candidates if c not in taken), first)
        taken.add(chosen)
        sets.append(chosen)
        for k in chosen:
            held[k] += 1
    return sets


def dirichlet_partition(labels, n_clients, alpha, seed):
    """Training indices per client (sorted), as Hsu et al. (2019) draw them: every client gets
    the same number of images (N // n_clients, the first N mod n_clients one more), with label
    proportions drawn from Dirichlet(alpha) for each client. A class that runs out is dropped
    from the draw and the client's remaining proportions renormalised, so the draw always ends:
    each pass takes at least one image."""
    if not alpha > 0:
        raise PartitionError(f"dirichlet_alpha={alpha}: must be positive (small: each client "
                             f"sees few classes; large: all classes alike).")
    generator = torch.Generator().manual_seed(seed)
    pools = class_pools(labels.cpu(), generator)
    rng = np.random.default_rng(seed)
    proportions = rng.dirichlet(np.full(NUM_CLASSES, float(alpha)), size=n_clients)
    remaining = np.array([p.numel() for p in pools])
    taken = np.zeros(NUM_CLASSES, dtype=np.int64)
    total = int(remaining.sum())
    parts = []
    for client in range(n_clients):
        need = total // n_clients + (client < total % n_clients)
        counts = np.zeros(NUM_CLASSES, dtype=np.int64)
        while need > 0:
            available = remaining > 0
            weights = proportions[client] * available
            weights = weights / weights.sum() if weights.sum() > 0 else available / available.sum()
            draw = np.minimum(rng.multinomial(need, weights), remaining)
            counts += draw
            remaining -= draw
            need -= int(draw.sum())
        parts.append(torch.sort(torch.cat([pools[k][taken[k]:taken[k] + counts[k]]
                                           for k in range(NUM_CLASSES)])).values)
        taken += counts
    return parts


def class_counts(labels, parts):
    """[clients, 10] numbers of images of each class in each part."""
    labels = labels.cpu()
    return torch.stack([torch.bincount(labels[p], minlength=NUM_CLASSES) for p in parts])


def test_partition(test_labels, train_counts, seed):
    """Test indices per client (sorted): the official test images of each client's classes, in
    the proportions of its training labels (client i gets floor(T_k n_ik / sum_j n_jk) of the
    T_k test images of class k), disjoint across clients."""
    generator = torch.Generator().manual_seed(seed + 1)
    pools = class_pools(test_labels.cpu(), generator)
    parts = [[] for _ in range(train_counts.shape[0])]
    for k, pool in enumerate(pools):
        holders = train_counts[:, k]
        if holders.sum() == 0:
            continue
        sizes = (pool.numel() * holders // holders.sum()).tolist()
        start = 0
        for client, size in enumerate(sizes):
            parts[client].append(pool[start:start + size])
            start += size
    return [torch.sort(torch.cat(p)).values for p in parts]


def validation_split(labels, parts, fraction, seed):
    """(training, validation) indices per part (sorted, disjoint): of each class in a part,
    round(fraction x its images) drawn with the seed go to validation, the rest to training."""
    generator = torch.Generator().manual_seed(seed + 2)
    labels = labels.cpu()
    train, val = [], []
    for part in parts:
        part = part[torch.randperm(part.numel(), generator=generator)]
        held_out = []
        for k in range(NUM_CLASSES):
            of_class = part[labels[part] == k]
            held_out.append(of_class[:math.floor(fraction * of_class.numel() + 0.5)])
        held_out = torch.cat(held_out)
        kept = part[~torch.isin(part, held_out)]
        train.append(torch.sort(kept).values)
        val.append(torch.sort(held_out).values)
    return train, val


def subset(dataset, train, val=None, test=None):
    """The images and labels of `dataset` at the given training, validation (taken from the
    training images) and test indices, gathered once onto the dataset's device."""
    device = dataset['train_y'].device
    val = torch.zeros(0, dtype=torch.long) if val is None else val
    out = {}
    for name, source, idx in (('train', 'train', train), ('val', 'train', val),
                              ('test', 'test', test)):
        idx = torch.arange(dataset[f'{source}_y'].shape[0]) if idx is None else idx
        idx = idx.to(device)
        out[f'{name}_x'] = dataset[f'{source}_x'][idx]
        out[f'{name}_y'] = dataset[f'{source}_y'][idx]
    return out


def with_validation(dataset, fraction, seed):
    """The whole set with `fraction` of its training images held out for validation
    (stratified, seeded); with fraction 0 the validation set is empty."""
    if fraction == 0:
        return {**dataset, 'val_x': dataset['train_x'][:0], 'val_y': dataset['train_y'][:0]}
    everything = [torch.arange(dataset['train_y'].shape[0])]
    train, val = validation_split(dataset['train_y'], everything, fraction, seed)
    return subset(dataset, train[0], val[0], None)
