"""Export the quantized model of a checkpoint as a packed file (packing.py): each quantized
weight as its center's index at ceil(log2 n) bits, the rest in float32.

    python export.py Results/<run>/best_quantized.pt      -> best_quantized.pt.packed
    python export.py Results/<run>/last.pt                -> last.pt.packed (Q_c(x) of the run)
    python export.py Results/<fed run>/best.pt            -> best.pt.client<i>.packed, per client
    python export.py Results/<fed run>/last.pt            -> last.pt.client<i>.packed, per client

The last line printed is one JSON object: path, bytes, float32_bytes, ratio and
bits_per_quantized_weight (for a federated best.pt, those of every client under 'clients').
Load a packed file with packing.load_packed(path), or evaluate it with
    python main_centralized.py --evaluate=Results/<run>/best_quantized.pt.packed
"""
import json
import os
import sys

import torch

import federated
import packing
import resnet
import runs
import utils


class ExportError(Exception):
    """A checkpoint that holds no quantized model; the message says what to pass instead."""


def center_indices(state, names, centers, on_centers, l1=True):
    """{name: index of each weight's center}. Weights stored already quantized (`on_centers`)
    are matched to the center they equal (first index among equal centers); full-precision
    weights get Q_c's assignment (by sign for n = 2, else the nearest center, measured as the
    run's `l1` measures it)."""
    indices = {}
    for row, name in enumerate(names):
        weights = state[name].to(torch.float32)
        if on_centers:
            match = weights.unsqueeze(-1) == centers[row]
            if not match.any(-1).all():
                raise ExportError(f"the weights of {name} are not on its centers: this "
                                  f"checkpoint's model is not the quantized one.")
            indices[name] = match.to(torch.uint8).argmax(-1)
        else:
            flat = weights.flatten()
            layer = torch.full_like(flat, row, dtype=torch.int64)
            indices[name] = utils.assign(flat, layer, centers, l1).view(weights.shape)
    return indices


def sizes(path, obj, state, size):
    """The file's size against the same model in float32."""
    float32_bytes = 4 * sum(t.numel() for t in state.values())
    weights, index_bytes, _ = packing.data_sizes(obj, packing.layout(obj['arch']))
    return {'path': path, 'bytes': size, 'float32_bytes': float32_bytes,
            'ratio': round(float32_bytes / size, 2),
            'bits_per_quantized_weight': round(8 * index_bytes / weights, 4)}


def write(path, arch, state, names, centers, on_centers, source, l1=True):
    """(path, the packed file's bytes, its sizes): export() writes every file of a checkpoint
    together, or none."""
    obj = packing.pack(arch, state, center_indices(state, names, centers, on_centers, l1),
                       centers, source)
    payload = runs.torch_bytes(obj)
    return path, payload, sizes(path, obj, state, len(payload))


def export_centralized(path, checkpoint):
    """The checkpoint of a main_centralized.py run: best_quantized.pt, best_fp.pt or last.pt."""
    cfg = checkpoint['config']
    arch = f"resnet{cfg['resn']}"
    state = checkpoint['state_dict'] if 'state_dict' in checkpoint else checkpoint['model']
    names = checkpoint.get('quantized_names') or utils.resnet_rule(resnet.build(arch))
    epoch = checkpoint['epoch']
    metrics = checkpoint.get('metrics') or checkpoint['rows'][-1]
    source = {'checkpoint': os.path.basename(path), 'epoch': epoch,
              'q_test_acc': metrics['q_test_acc']}
    centers = checkpoint['centers'].cpu()
    on_centers = checkpoint.get('quantized')
    if on_centers is None:  # a checkpoint from before the flag: look at the weights
        on_centers = all(bool((state[name].unsqueeze(-1) == centers[row]).any(-1).all())
                         for row, name in enumerate(names))
    return write(f'{path}.packed', arch, state, names, centers, on_centers, source,
                 cfg.get('l1', True))


def export_federated_last(path, checkpoint):
    """Every quantized client of a main_federated.py last.pt: Q_c(x) of its model as trained
    so far (what its q_test_acc evaluates)."""
    cfg = checkpoint['config']
    if checkpoint['clients'] is None:
        raise ExportError(f"{path} is the last.pt of a Flower run, whose clients keep their own "
                          f"states: export its best.pt, or the clients' files under clients/.")
    out = []
    for client, saved in enumerate(checkpoint['clients']):
        if saved.get('centers') is None:
            continue
        arch, bits = federated.client_plan(cfg, client)
        model = resnet.build(arch)
        names = federated.QUANTIZATION_RULES.get(arch, utils.resnet_rule)(model)
        source = {'checkpoint': os.path.basename(path), 'round': checkpoint['round'],
                  'client': client,
                  'q_test_acc': checkpoint['rows'][-1]['clients'][client]['q_test_acc']}
        out.append(write(f"{path}.client{client}.packed", arch, saved['model'], names,
                         saved['centers'].cpu(), False, source, cfg.get('l1', True)))
    if not out:
        raise ExportError(f"{path} holds no quantized personalised model (a FedAvg run, or only "
                          f"full-precision clients): there is nothing to pack.")
    return out


def export_federated(path, checkpoint):
    """Every quantized client of a main_federated.py best.pt."""
    clients = [c for c in checkpoint['clients'] if c['centers'] is not None]
    if not clients:
        raise ExportError(f"{path} holds no quantized personalised model (a FedAvg run, or only "
                          f"full-precision clients): there is nothing to pack.")
    out = []
    for c in clients:
        source = {'checkpoint': os.path.basename(path), 'round': checkpoint['round'],
                  'client': c['client'],
                  'q_test_acc': checkpoint['metrics']['clients'][c['client']]['q_test_acc']}
        out.append(write(f"{path}.client{c['client']}.packed", c['arch'], c['state_dict'],
                         c['quantized_names'], c['centers'], True, source))
    return out


def export(path):
    """Pack the checkpoint's quantized model(s); returns their sizes (a list for a federated
    checkpoint, one per client)."""
    checkpoint = resnet.read_checkpoint(path)
    try:
        files = packed_files(path, checkpoint)
    except (KeyError, TypeError, AttributeError, IndexError) as e:
        raise ExportError(f"{path} is not a checkpoint this project wrote, or was edited ("
                          f"{type(e).__name__}: {e}): pass a QuPeD run's best_quantized.pt or "
                          f"last.pt, or a federated best.pt or last.pt, as the scripts wrote "
                          f"it.") from None
    except ValueError as e:
        raise ExportError(f"{path}: {e}, the architecture its configuration names. The file "
                          f"was edited or belongs to another run: export the checkpoint as the "
                          f"run wrote it.") from None
    runs.write_together({file: payload for file, payload, _ in files})
    result = [info for _, _, info in files]
    federated_file = runs.kind_of(checkpoint) in ('federated', 'flower')
    return result if len(files) > 1 or federated_file else result[0]


def packed_files(path, checkpoint):
    if packing.is_packed(checkpoint):
        raise ExportError(f"{path} is already a packed file.")
    kind = runs.kind_of(checkpoint)
    if kind in ('federated', 'flower'):
        return (export_federated_last if runs.file_of(checkpoint) == 'last' else
                export_federated)(path, checkpoint)
    if kind == 'centralized' and checkpoint.get('centers') is not None:
        return [export_centralized(path, checkpoint)]
    if kind == 'centralized' and checkpoint['config'].get('fp'):
        raise ExportError(f"{path} is from a full-precision run (fp=True): it has no centers, "
                          f"so there is no quantized model to pack.")
    if kind == 'centralized':
        what = "holds no centers"
    elif isinstance(checkpoint, dict) and all(torch.is_tensor(v) for v in checkpoint.values()):
        what = "is a bare state_dict, which holds no centers"
    else:
        what = ("is not a checkpoint of this project (neither a `kind` field nor its contents "
                "say which run wrote it)")
    raise ExportError(f"{path} {what}: pass a checkpoint of a QuPeD run (best_quantized.pt, "
                      f"last.pt, or a federated best.pt or last.pt).")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python export.py CHECKPOINT", file=sys.stderr)
        raise SystemExit(2)
    try:
        result = export(argv[0])
    except (ExportError, resnet.CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    except OSError as e:
        print(f"error: cannot write the packed file beside {argv[0]} ({e.strerror}); nothing was "
              f"written. Make the folder writable, or copy the checkpoint to a writable folder "
              f"and export it there.", file=sys.stderr)
        raise SystemExit(2)
    if isinstance(result, list):
        for entry in result:
            print(json.dumps(entry))
        result = {'clients': result}
    print(json.dumps(result))
    return result


if __name__ == '__main__':
    main()
