"""Reproduce the authors' update step from the golden vectors in $QUPED_GOLDEN_DIR.

Each `*.pt` file (format: ../shared/reference/README.md) is checked from its `meta` alone, so a
new file in the same format is picked up with no code change. What our code computes is compared
exactly: `centers_init`, `centers_in`, the quantized layers of `quantized_state_in` and every
step's `members_out`. `state_out` and `centers_out` are compared within 1e-5 of each tensor's
largest magnitude.

Files with several steps run torch's own optimizer (Adam, SGD) between the updates. Its output
after one step differs from the file's by one float32 ulp (1.5e-8 here, whatever the thread
count or conv backend): the file was made with another torch build. After that Adam step,
parameters whose gradient is near Adam's eps (1e-8) amplify such ulps, so a multi-step
`state_out` moves by 1e-4 to 3e-3 when the *input* state is perturbed by one ulp: more than our
distance to the file. Those `state_out` comparisons are therefore an expected failure of their
own (`test_multistep_state_out`), strict, so that an environment that does reproduce them is
noticed. Everything else in those files (centers, member counts at every step) must match.
"""
import os
from pathlib import Path

import pytest
import torch

import resnet
import utils

REPO = Path(__file__).resolve().parents[1]
GOLDEN_DIR = Path(os.environ.get('QUPED_GOLDEN_DIR', REPO / '../shared/reference/golden'))
GOLDEN_FILES = sorted(GOLDEN_DIR.glob('*.pt')) if GOLDEN_DIR.is_dir() else []
RTOL = 1e-5


def compare_exact(label, got, want):
    if got.shape != want.shape or not torch.equal(got.to(want.dtype), want):
        same_shape = got.shape == want.shape
        diff = (got.double() - want.double()).abs().max().item() if same_shape else None
        return [f"{label}: not equal (shape {tuple(got.shape)} vs {tuple(want.shape)}, "
                f"max abs diff {diff})"]
    return []


def compare_close(label, got, want):
    scale = want.double().abs().max().item()
    err = (got.double() - want.double()).abs().max().item() if want.numel() else 0.0
    if got.shape != want.shape or err > RTOL * max(scale, 1e-30):
        return [f"{label}: max abs error {err:.3g} > {RTOL} x {scale:.3g}"]
    return []


def compare_states(label, got, want, compare):
    if set(got) != set(want):
        return [f"{label}: keys differ: {sorted(set(got) ^ set(want))}"]
    return [m for k in want for m in compare(f"{label}[{k}]", got[k], want[k])]


def compare_quantized_state(model, weights, centers, golden, optimizer):
    """Q_c layers exactly; the rest exactly too unless torch's optimizer produced it."""
    quantized = utils.quantized_state(weights, centers)
    want = golden['quantized_state_in']
    found = compare_states('quantized_state_in', quantized,
                           {k: want[k] for k in quantized}, compare_exact)
    rest = {k: v for k, v in model.state_dict().items() if k not in quantized}
    return found + compare_states('quantized_state_in', rest,
                                  {k: v for k, v in want.items() if k not in quantized},
                                  compare_exact if optimizer is None else compare_close)


def fp_optimizer(meta, model):
    if meta['optimizer'] == 'adam':
        return torch.optim.Adam(model.parameters(), lr=meta['lr1'])
    if meta['optimizer'] == 'sgd':
        return torch.optim.SGD(model.parameters(), lr=meta['lr1'], momentum=0.9)
    assert meta['optimizer'] is None, f"unknown optimizer {meta['optimizer']!r} in meta"
    return None


def mismatches(golden, center_reg_fix=False):
    """Run the update step that `golden['meta']` describes; every way it differs from the file."""
    meta = golden['meta']
    torch.manual_seed(0)
    model = resnet.build(meta['arch'])
    model.load_state_dict(golden['state_in'])
    model.train()
    weights = utils.QuantizedWeights(model)
    n = meta['n_centroids']
    found = compare_exact('centers_init', utils.init_centers(weights, n), golden['centers_init'])
    centers = utils.init_centers(weights, n, adam=meta['adam_centers'])
    found += compare_exact('centers_in', centers, golden['centers_in'])
    optimizer = fp_optimizer(meta, model)
    for step in range(meta['steps']):
        x, y = golden['x'][step], golden['y'][step]
        if optimizer is not None:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        if step == 0:
            found += compare_quantized_state(model, weights, centers, golden, optimizer)
        members = utils.quped_update(weights, centers, x, y, lr1=meta['lr1'], lr2=meta['lr2'],
                                     lam=meta['lamb'], lam2=meta['lamb2'], l1=meta['l1'],
                                     center_reg_fix=center_reg_fix)
        found += compare_exact(f'members_out[{step}]', members, golden['members_out'][step])
    found += compare_states('state_out', model.state_dict(), golden['state_out'], compare_close)
    found += compare_close('centers_out', centers, golden['centers_out'])
    return found


def load(path):
    return torch.load(path, map_location='cpu', weights_only=False)


def is_multistep(meta):
    return meta['steps'] > 1 and meta['optimizer'] is not None


@pytest.mark.skipif(not GOLDEN_FILES, reason=f"no golden files in {GOLDEN_DIR}")
@pytest.mark.parametrize('path', GOLDEN_FILES, ids=[p.stem for p in GOLDEN_FILES])
def test_reproduces_golden_file(path):
    golden = load(path)
    found = mismatches(golden)
    if is_multistep(golden['meta']):
        found = [m for m in found if not m.startswith('state_out')]
    assert found == []


MULTISTEP_FILES = [p for p in GOLDEN_FILES if is_multistep(load(p)['meta'])]


@pytest.mark.xfail(strict=True, reason="torch's optimizer steps amplify one-ulp differences of "
                   "another torch build beyond 1e-5 (module docstring)")
@pytest.mark.parametrize('path', MULTISTEP_FILES, ids=[p.stem for p in MULTISTEP_FILES])
def test_multistep_state_out(path):
    assert [m for m in mismatches(load(path)) if m.startswith('state_out')] == []


def first_golden_file(**meta):
    for path in GOLDEN_FILES:
        golden = load(path)
        if all(golden['meta'][k] == v for k, v in meta.items()):
            return golden
    pytest.skip(f"no golden file with {meta} in {GOLDEN_DIR}")


@pytest.mark.parametrize('key', ['centers_init', 'quantized_state_in', 'members_out',
                                 'state_out', 'centers_out'])
def test_harness_fails_on_a_perturbed_expectation(key):
    golden = first_golden_file(l1=True, n_centroids=4)
    target = golden[key]
    if isinstance(target, dict):  # perturb one quantized layer
        target = target['layer1.0.conv1.weight']
    flat = target.view(-1)
    flat[flat.abs().argmax()] += 2e-4 * flat.abs().max() if key != 'members_out' else 1
    assert any(m.startswith(key) for m in mismatches(golden))


def test_center_reg_fix_departs_from_the_reference():
    golden = first_golden_file(l1=True, n_centroids=2, lr2=1e-4, steps=1)
    found = mismatches(golden, center_reg_fix=True)
    assert found and all(m.startswith('centers_out') for m in found)
