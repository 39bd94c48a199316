"""The compressed model file: every quantized weight as its center's index, packed at
ceil(log2 n) bits, each layer's centers and every other parameter and buffer in float32.

The file is a `torch.save`d dict that loads with `weights_only=True`: a little metadata (the
architecture, n, which of its state_dict entries are quantized, the integer buffers) and one
uint8 tensor holding, in order, the index bits of all quantized layers (little-endian within
each index), the centers ([layers, n] float32) and the other floating tensors (float32), in the
architecture's state_dict order, which also gives every shape. One tensor and no names keep the
container's overhead near a kilobyte.

This module knows the file format, not the algorithm: the caller hands it each quantized
layer's center indices.
"""
import hashlib
import json
import math
import os

import torch

import resnet

FORMAT, VERSION = 'quped-packed', 2  # 2: with a SHA-256 of the contents


def index_bits(n_centroids):
    """Bits per index: ceil(log2 n), at least 1."""
    return max(1, math.ceil(math.log2(n_centroids)))


def pack_bits(indices, bits):
    """uint8 bytes holding `indices` (int64, each < 2**bits) at `bits` bits each."""
    shifts = torch.arange(bits, dtype=torch.int64)
    stream = ((indices.unsqueeze(1) >> shifts) & 1).flatten().to(torch.uint8)
    stream = torch.cat([stream, stream.new_zeros(-stream.numel() % 8)])
    return (stream.view(-1, 8) << torch.arange(8, dtype=torch.uint8)).sum(1, dtype=torch.uint8)


def unpack_bits(packed, count, bits):
    """The first `count` indices of `bits` bits each in `packed`, as int64."""
    stream = ((packed.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1).flatten()
    stream = stream[:count * bits].view(count, bits).to(torch.int64)
    return (stream << torch.arange(bits, dtype=torch.int64)).sum(1)


def float_bytes(tensor):
    return tensor.detach().cpu().to(torch.float32).contiguous().flatten().view(torch.uint8)


def layout(arch):
    """The model's state_dict keys and shapes, in its order: the packed file stores tensors in
    this order and needs no names or shapes of its own."""
    return [(name, tuple(t.shape), t.is_floating_point())
            for name, t in resnet.build(arch).state_dict().items()]


def pack(arch, state_dict, indices, centers, source=None):
    """The packed file's contents for a model of `arch`: `state_dict` gives every tensor but the
    quantized layers, which `indices` ({name: int64 tensor of the layer's shape}, in the order
    of the rows of `centers`, [layers, n]) give as indices into their row of centers."""
    n = centers.shape[1]
    bits = index_bits(n)
    keys = [name for name, _, _ in layout(arch)]
    if set(keys) != set(state_dict):
        raise ValueError(f"the state_dict does not fit {arch}")
    flat = torch.cat([indices[name].flatten().cpu() for name in indices])
    if flat.numel() and (flat.min() < 0 or flat.max() >= n):
        raise ValueError(f"center indices must lie in 0..{n - 1}")
    packed_indices = pack_bits(flat, bits)
    floats = [float_bytes(state_dict[name]) for name in keys
              if name not in indices and state_dict[name].is_floating_point()]
    obj = {'format': FORMAT, 'version': VERSION, 'arch': arch, 'n_centroids': n, 'bits': bits,
           'quantized': [keys.index(name) for name in indices],
           'integers': [state_dict[name].item() for name in keys
                        if not state_dict[name].is_floating_point()],
           'source': source or {}, 'blob': torch.cat([packed_indices, float_bytes(centers),
                                                       *floats])}
    return {**obj, 'sha256': digest(obj)}


def digest(obj):
    """SHA-256 of everything in the file but the digest: the metadata, as JSON, and the blob."""
    metadata = {k: v for k, v in obj.items() if k not in ('blob', 'sha256')}
    hasher = hashlib.sha256(json.dumps(metadata, sort_keys=True).encode())
    hasher.update(obj['blob'].numpy().tobytes())
    return hasher.hexdigest()


def is_packed(obj):
    return isinstance(obj, dict) and obj.get('format') == FORMAT


def damaged(path, what):
    return resnet.CheckpointError(f"packed file {os.fspath(path)!r} is damaged ({what}); export "
                                  f"it again from its checkpoint with: python export.py "
                                  f"CHECKPOINT")


def data_sizes(obj, entries):
    """(quantized weights, index bytes, float32 values) the metadata implies."""
    quantized = set(obj['quantized'])
    weights = sum(math.prod(shape) for i, (_, shape, _) in enumerate(entries) if i in quantized)
    floats = sum(math.prod(shape) for i, (_, shape, floating) in enumerate(entries)
                 if floating and i not in quantized)
    centers = len(quantized) * obj['n_centroids']
    return weights, math.ceil(weights * obj['bits'] / 8), floats + centers


def unpack(obj, path='<packed>'):
    """(arch, state_dict, centers): the model's full state, each quantized weight its center."""
    try:
        if obj.get('version') != VERSION:
            raise ValueError(f"version {obj.get('version')!r}, this code reads {VERSION}")
        if not torch.is_tensor(obj.get('blob')) or obj.get('sha256') != digest(obj):
            raise ValueError("its SHA-256 does not match its contents: it was altered or "
                             "truncated")
        entries = layout(obj['arch'])
        n, bits, blob, rows = obj['n_centroids'], obj['bits'], obj['blob'], obj['quantized']
        weights, index_bytes, floats = data_sizes(obj, entries)
        integers = [name for name, _, floating in entries if not floating]
        if bits != index_bits(n) or len(obj['integers']) != len(integers) or not all(
                0 <= i < len(entries) for i in rows):
            raise ValueError("its sizes disagree with each other")
        if not torch.is_tensor(blob) or blob.dtype != torch.uint8 or (
                blob.numel() != index_bytes + 4 * floats):
            raise ValueError(f"{blob.numel() if torch.is_tensor(blob) else 'no'} data bytes "
                             f"where the metadata describes {index_bytes + 4 * floats}")
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise damaged(path, str(e) or type(e).__name__) from None
    indices = unpack_bits(blob[:index_bytes], weights, bits)
    if indices.numel() and indices.max() >= n:
        raise damaged(path, f"a center index above {n - 1}")
    values = blob[index_bytes:].clone().view(torch.float32)
    centers, values = values[:len(rows) * n].view(len(rows), n), values[len(rows) * n:]
    row_of = {entry: row for row, entry in enumerate(rows)}
    counters = iter(obj['integers'])
    state, first, offset = {}, 0, 0
    for i, (name, shape, floating) in enumerate(entries):
        size = math.prod(shape)
        if i in row_of:
            state[name] = centers[row_of[i]][indices[first:first + size]].view(shape)
            first += size
        elif floating:
            state[name] = values[offset:offset + size].view(shape)
            offset += size
        else:
            state[name] = torch.tensor(next(counters), dtype=torch.int64)
    return obj['arch'], state, centers


def load_packed(path, device='cpu'):
    """A ready model (eval mode) from a packed file, and its metadata (arch, n, bits, centers,
    source)."""
    obj = resnet.read_checkpoint(path)
    if not is_packed(obj):
        raise resnet.CheckpointError(f"{os.fspath(path)!r} is not a packed model file (made by "
                                     f"export.py).")
    arch, state, centers = unpack(obj, path)
    model = resnet.build(arch)  # unpack has built one: arch is known
    model.load_state_dict(state)
    info = {'arch': arch, 'n_centroids': obj['n_centroids'], 'bits': obj['bits'],
            'centers': centers, 'source': obj['source']}
    return model.to(device).eval(), info
