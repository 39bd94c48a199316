"""packing.py: the packed format of a quantized model (bit-packed center indices, the centers,
the full-precision rest), its exact size, and its refusal of damaged files."""
import io
import os

import pytest
import torch

import export
import main_centralized as mc
import packing
import resnet
import runs
from conftest import central_args, digests, exits_with_error, run_folder


# --- damaged packed files ------------------------------------------------------------------------

def test_a_packed_file_with_one_byte_changed_is_refused(cifar_root, tmp_path, capsys):
    folder = mc.main(central_args(cifar_root, tmp_path, '--EPOCHS=1'))
    export.main([os.path.join(folder, 'best_quantized.pt')])
    path = os.path.join(folder, 'best_quantized.pt.packed')
    obj = torch.load(path, weights_only=True)
    obj['blob'][100] ^= 1
    torch.save(obj, path)
    before = digests(folder)
    capsys.readouterr()
    exits_with_error(capsys, mc.main, [f'--evaluate={path}', f'--data_root={cifar_root}'],
                     'SHA-256 does not match', 'export it again')
    with pytest.raises(resnet.CheckpointError, match='SHA-256'):
        packing.load_packed(path)
    assert digests(folder) == before


# --- the format ----------------------------------------------------------------------------------

@pytest.mark.parametrize('n', [2, 3, 4, 8, 16])
@pytest.mark.parametrize('count', [1, 7, 9, 1000, 2305])
def test_bits_round_trip(n, count):
    generator = torch.Generator().manual_seed(n * count)
    indices = torch.randint(0, n, (count,), generator=generator)
    bits = packing.index_bits(n)
    packed = packing.pack_bits(indices, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-count * bits // 8)
    assert torch.equal(packing.unpack_bits(packed, count, bits), indices)


def test_index_bits():
    assert [packing.index_bits(n) for n in (2, 3, 4, 5, 8, 9, 16)] == [1, 2, 2, 3, 3, 4, 4]


@pytest.mark.parametrize('arch, n', [('resnet8', 3), ('cifarnet', 8), ('resnet20', 2)])
def test_pack_unpack_round_trip(arch, n):
    torch.manual_seed(0)
    model = resnet.build(arch)
    state = model.state_dict()
    names = [k for k, v in state.items() if v.dim() == 4][1:]
    centers = torch.randn(len(names), n).sort(1).values
    indices = {name: torch.randint(0, n, state[name].shape) for name in names}
    obj = packing.pack(arch, state, indices, centers)
    got_arch, got, got_centers = packing.unpack(obj)
    assert got_arch == arch and torch.equal(got_centers, centers)
    for row, name in enumerate(names):
        assert torch.equal(got[name], centers[row][indices[name]])
    assert all(torch.equal(got[k], v) for k, v in state.items() if k not in indices)


def container_bytes():
    buffer = io.BytesIO()
    torch.save({'blob': torch.zeros(0, dtype=torch.uint8)}, buffer)
    return len(buffer.getvalue())


@pytest.mark.parametrize('arch, n', [('resnet20', 2), ('resnet20', 4), ('resnet32', 2)])
def test_packed_size_is_the_arithmetic(tmp_path, arch, n):
    """bits x weights / 8 + 4 x (centers + full-precision values) + torch's container, within
    1 KB (the metadata)."""
    torch.manual_seed(0)
    model = resnet.build(arch)
    state = model.state_dict()
    names = [k for k, v in state.items() if v.dim() == 4][1:]
    indices = {name: torch.randint(0, n, state[name].shape) for name in names}
    path = tmp_path / 'model.packed'
    runs.save_torch(path, packing.pack(arch, state, indices, torch.randn(len(names), n)))
    weights = sum(state[name].numel() for name in names)
    rest = sum(v.numel() for k, v in state.items() if k not in indices and v.is_floating_point())
    arithmetic = (-(-weights * packing.index_bits(n) // 8) + 4 * (rest + len(names) * n)
                  + container_bytes())
    assert 0 <= os.path.getsize(path) - arithmetic < 1024
    if arch == 'resnet20' and n == 2:
        assert os.path.getsize(path) < 52_000  # about 1 bit per weight: 1.1 MB in float32


def test_damaged_packed_files_give_a_clear_error(cifar_root, tmp_path, capsys):
    folder = run_folder(cifar_root, tmp_path)
    path = os.path.join(folder, 'best_quantized.pt')
    export.main([path])
    good = open(path + '.packed', 'rb').read()
    open(tmp_path / 'truncated.packed', 'wb').write(good[:len(good) // 2])
    with pytest.raises(resnet.CheckpointError, match='could not be read'):
        packing.load_packed(tmp_path / 'truncated.packed')
    obj = torch.load(path + '.packed', weights_only=True)
    for label, change in (('short blob', {'blob': obj['blob'][:-10]}), ('version', {'version': 9}),
                          ('arch', {'arch': 'resnet20'}), ('no bits', {'bits': None})):
        runs.save_torch(tmp_path / 'bad.packed', {**obj, **change})
        with pytest.raises(resnet.CheckpointError, match='is damaged'):
            packing.load_packed(tmp_path / 'bad.packed')
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        mc.main([f'--evaluate={tmp_path}/truncated.packed', f'--data_root={cifar_root}'])
    assert exit_info.value.code == 2 and 'Traceback' not in capsys.readouterr().err
