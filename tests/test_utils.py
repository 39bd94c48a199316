"""Properties of utils.py and its formulas worked by hand on a tiny module."""
import pytest
import torch
import torch.nn as nn

import resnet
import utils


class Tiny(nn.Module):
    """A first parameter (never quantized) and two 4-D weights; the output is linear in the
    weights, so with loss = output.sum() the gradient of weight i is the sum of input i."""

    def __init__(self, w1, w2=(0.1, -0.2, 0.3, -0.4)):
        super().__init__()
        self.first = nn.Parameter(torch.zeros(1, 1, 1, 1))
        self.w1 = nn.Parameter(torch.tensor(w1).view(1, 1, 1, -1))
        self.w2 = nn.Parameter(torch.tensor(w2).view(1, 1, 1, -1))

    def forward(self, x):
        n1 = self.w1.numel()
        return ((x[:, :n1] * self.w1.view(-1)).sum(1) + (x[:, n1:] * self.w2.view(-1)).sum(1)
                + self.first.view(()))


def output_sum(out, y):
    return out.sum()


W1 = [-0.5, -0.45, -0.1, 0.3, 0.7, 0.8]


def tiny_setup(inputs_w1=1.0, w1=W1, centers_w1=(-0.4, 0.6)):
    model = Tiny(w1)
    weights = utils.QuantizedWeights(model)
    centers = torch.tensor([list(centers_w1), [-0.3, 0.3]])
    x = torch.cat([torch.as_tensor(inputs_w1, dtype=torch.float32).expand(len(w1)),
                   torch.ones(4)]).unsqueeze(0)
    return model, weights, centers, x


def resnet8_with_centers(n, seed=0):
    torch.manual_seed(seed)
    model = resnet.build('resnet8')
    weights = utils.QuantizedWeights(model)
    return model, weights, utils.init_centers(weights, n)


def test_quantized_layers_are_every_4d_weight_but_the_first():
    assert utils.QuantizedWeights(Tiny(W1)).names == ['w1', 'w2']
    for arch, count in (('resnet8', 6), ('resnet20', 18), ('resnet32', 30)):
        names = utils.QuantizedWeights(resnet.build(arch)).names
        assert len(names) == count and 'conv1.weight' not in names
        assert all(name.endswith('conv1.weight') or name.endswith('conv2.weight')
                   for name in names)


def test_init_centers_by_hand():
    weights = utils.QuantizedWeights(Tiny(W1))
    two = utils.init_centers(weights, 2)
    assert two[0].tolist() == pytest.approx([(-0.5 - 0.45 - 0.1) / 3, (0.3 + 0.7 + 0.8) / 3])
    assert two[1].tolist() == pytest.approx([-0.3, 0.2])
    four = utils.init_centers(weights, 4)
    assert four[0].tolist() == pytest.approx([-0.5, -0.06666667, 0.36666667, 0.8])
    adam = utils.init_centers(weights, 4, adam=True)
    assert adam[:, 0].tolist() == [-1, -1] and adam[:, -1].tolist() == [1, 1]
    assert torch.equal(adam[:, 1:3], four[:, 1:3])
    with pytest.raises(ValueError, match='at least 2'):
        utils.init_centers(weights, 1)


def test_init_centers_refuses_a_layer_without_negative_weights():
    weights = utils.QuantizedWeights(Tiny([0.1, 0.2, 0.3, 0.4]))
    with pytest.raises(ValueError, match='w1'):
        utils.init_centers(weights, 2)


@pytest.mark.parametrize('n', [3, 4, 5, 8])
def test_assignment_is_the_nearest_center_first_index_winning_ties(n):
    torch.manual_seed(n)
    centers = torch.sort(torch.randn(3, n)).values
    centers[1, 1] = centers[1, 2]  # a tie: index 1 must win
    layer = torch.randint(0, 3, (500,))
    x = torch.randn(500)
    x[:5] = centers[1, 1]
    layer[:5] = 1
    idx = utils.assign(x, layer, centers)
    for i in range(500):
        distances = [abs(x[i].item() - c) for c in centers[layer[i]].tolist()]
        assert idx[i].item() == distances.index(min(distances))


def test_l2_assignment_measures_squared_distances_as_the_reference():
    """x = 2e-23 between centers 0 and 3e-23: |x - c| picks the second, but both squares
    underflow to 0 in float32, so the reference's argmin of (x - c)^2 takes the first."""
    centers = torch.tensor([[0.0, 3e-23, 0.5, 1.0]])
    x, layer = torch.tensor([2e-23]), torch.zeros(1, dtype=torch.long)
    assert utils.assign(x, layer, centers, l1=True).tolist() == [1]
    assert utils.assign(x, layer, centers, l1=False).tolist() == [0]


def test_assignment_for_two_centers_is_by_sign_even_when_both_are_positive():
    centers = torch.tensor([[0.2, 0.9]])
    x = torch.tensor([-0.3, 0.0, 0.1, 0.85, -1e-9])
    assert utils.assign(x, torch.zeros(5, dtype=torch.long), centers).tolist() == [0, 1, 1, 1, 0]


@pytest.mark.parametrize('n', [2, 3, 4, 8])
def test_quantizer_is_idempotent(n):
    _, weights, centers = resnet8_with_centers(n)
    q, _ = utils.quantize(weights.flat(), weights.layer, centers)
    again, _ = utils.quantize(q, weights.layer, centers)
    assert torch.equal(again, q)
    assert all(set(row.tolist()) <= set(c.tolist()) for row, c in
               zip(q.split(weights.numels), centers))


def test_prox_with_zero_lambda_only_clamps():
    w1 = [-1.7, -0.45, -0.1, 0.3, 0.7, 1.2]
    model, weights, centers, _ = tiny_setup(w1=w1)
    utils.prox_step(weights, centers, lr1=0.1, lam=0.0, l1=True, lr2=1e-4)
    assert model.w1.view(-1).tolist() == pytest.approx([-1.0, -0.45, -0.1, 0.3, 0.7, 1.0])
    model, weights, centers, _ = tiny_setup(w1=w1)
    utils.prox_step(weights, centers, lr1=0.1, lam=0.0, l1=False)
    assert torch.equal(model.w1.view(-1), torch.tensor(w1))


@pytest.mark.parametrize('n', [2, 4])
def test_prox_with_huge_lambda_puts_every_weight_on_its_center(n):
    _, weights, centers = resnet8_with_centers(n)
    q, _ = utils.quantize(weights.flat(), weights.layer, centers)
    utils.prox_step(weights, centers, lr1=0.1, lam=1e6, l1=True, lr2=1e-4)
    assert torch.equal(weights.flat(), q)


def test_prox_soft_threshold_by_hand():
    model, weights, centers, _ = tiny_setup()  # centers -0.4 / 0.6, t = 0.5 * 0.1 = 0.05
    utils.prox_step(weights, centers, lr1=0.1, lam=0.5, l1=True, lr2=1e-4)
    assert model.w1.view(-1).tolist() == pytest.approx([-0.45, -0.4, -0.15, 0.35, 0.65, 0.75])


def test_prox_l2_by_hand():
    model, weights, centers, _ = tiny_setup()
    utils.prox_step(weights, centers, lr1=0.25, lam=1.0, l1=False)  # (x + 0.5 q) / 1.5
    assert model.w1[0, 0, 0, 3].item() == pytest.approx((0.3 + 0.5 * 0.6) / 1.5)
    assert model.w1[0, 0, 0, 0].item() == pytest.approx((-0.5 + 0.5 * -0.4) / 1.5)


def test_binary_prox_with_fixed_centers_by_hand():
    # x <- sign(x) (relu(||x| - 1| - t) sign(|x| - 1) + 1), clamped; t = 0.1
    model, weights, centers, _ = tiny_setup(w1=[0.5, 1.5, -0.95, -0.2, 0.0, 0.85])
    utils.prox_step(weights, centers, lr1=0.1, lam=1.0, l1=True, lr2=0)
    assert model.w1.view(-1).tolist() == pytest.approx([0.6, 1.0, -1.0, -0.3, 0.0, 0.95])


def test_center_step_l1_by_hand():
    model, weights, centers, x = tiny_setup()
    members, _ = utils.center_step(weights, centers, x, None, lr2=0.01, lam2=2.0,
                                loss_fn=output_sum)
    assert members[0].tolist() == [3, 3]
    assert centers[0].tolist() == pytest.approx([-0.41, 0.55])
    # the second layer: w2 = (0.1, -0.2, 0.3, -0.4), centers -0.3 / 0.3, every gradient 1;
    # c0's members -0.2 (above), -0.4 (below): pos - neg = 0; c1's 0.1 (below), 0.3 (on it): -1
    assert centers[1].tolist() == pytest.approx([-0.3 - 0.02, 0.3 - 0.02 + 0.02])


def test_center_step_fix_uses_the_descent_sign():
    _, weights, centers, x = tiny_setup()
    utils.center_step(weights, centers, x, None, lr2=0.01, lam2=2.0, center_reg_fix=True,
                      loss_fn=output_sum)
    assert centers[0].tolist() == pytest.approx([-0.45, 0.59])


def test_center_gradient_is_clipped_as_a_sum():
    _, weights, centers, x = tiny_setup(inputs_w1=5.0)  # g = 15 per center, clipped to 10
    utils.center_step(weights, centers, x, None, lr2=0.01, lam2=0.0, loss_fn=output_sum)
    assert centers[0].tolist() == pytest.approx([-0.5, 0.5])


def test_center_step_l2_by_hand():
    _, weights, centers, x = tiny_setup()
    utils.center_step(weights, centers, x, None, lr2=0.01, lam2=2.0, l1=False,
                      loss_fn=output_sum)
    s0, s1 = -0.5 - 0.45 - 0.1, 0.3 + 0.7 + 0.8
    assert centers[0].tolist() == pytest.approx([(-0.4 - 0.03 + 0.04 * s0) / 1.12,
                                                 (0.6 - 0.03 + 0.04 * s1) / 1.12])


def test_centers_that_cross_are_sorted_and_members_count_before_sorting():
    x = torch.tensor([[-5.0, -5, -5, 5, 5, 5, 1, 1, 1, 1]])
    _, weights, centers, _ = tiny_setup(centers_w1=(-0.01, 0.01))
    members, _ = utils.center_step(weights, centers, x, None, lr2=0.01, lam2=0.0,
                                loss_fn=output_sum)
    assert centers[0].tolist() == pytest.approx([-0.09, 0.09])
    assert members[0].tolist() == [3, 3]


def test_coinciding_centers_share_their_members():
    _, weights, _, x = tiny_setup()
    centers = torch.tensor([[0.2, 0.2, 0.2], [-0.3, 0.0, 0.3]])
    members, _ = utils.center_step(weights, centers, x, None, lr2=0.0, lam2=0.0,
                                loss_fn=output_sum)
    assert members[0].tolist() == [6, 6, 6]


@pytest.mark.parametrize('fix', [False, True])
def test_fix_moves_a_center_towards_the_median_of_its_members(fix):
    torch.manual_seed(0)
    model = resnet.build('resnet8')
    weights = utils.QuantizedWeights(model)
    centers = utils.init_centers(weights, 2, adam=True)  # -1/+1, far from the members
    q, key = utils.quantize(weights.flat(), weights.layer, centers)
    medians = torch.stack([torch.stack([w[w < 0].median(), w[w >= 0].median()])
                           for w in weights.flat().split(weights.numels)])
    before = (centers - medians).abs()
    zero_loss = lambda out, y: out.sum() * 0  # noqa: E731  (isolates the regulariser)
    utils.center_step(weights, centers, torch.randn(4, 3, 32, 32), None, lr2=1e-4,
                      lam2=1e-3, center_reg_fix=fix, loss_fn=zero_loss)
    after = (centers - medians).abs()
    assert bool((after < before).all()) == fix
    assert bool((after > before).all()) == (not fix)


def test_center_step_leaves_the_full_precision_model_untouched():
    torch.manual_seed(0)
    model = resnet.build('resnet8')
    model.train()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    weights = utils.QuantizedWeights(model)
    centers = utils.init_centers(weights, 2)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    utils.center_step(weights, centers, x, y, lr2=1e-2, lam2=1e-3)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm buffers included
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))



def test_center_step_runs_in_training_mode_whatever_the_models_mode():
    """The quantized pass uses batch statistics (the reference's fresh model is in training
    mode) even when the full-precision model is in eval mode."""
    results = []
    for mode in (True, False):
        torch.manual_seed(0)
        model = resnet.build('resnet8').train(mode)
        weights = utils.QuantizedWeights(model)
        centers = utils.init_centers(weights, 2)
        x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
        quantized = resnet.build('resnet8').train()
        quantized.load_state_dict({**model.state_dict(), **utils.quantized_state(weights,
                                                                                 centers)})
        _, logits = utils.center_step(weights, centers, x, y, lr2=1e-2, lam2=1e-3)
        assert torch.equal(logits, quantized(x).detach())  # batch statistics
        results.append((centers, logits))
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize('threads', [1, 2, 3, 4])
@pytest.mark.parametrize('numel', [100, 32767, 32768, 36864, 65537, 131072, 200000])
def test_reduction_chunks_sum_as_torch_sum_does_at_that_thread_count(numel, threads):
    """torch.sum of a masked layer at `threads` threads equals masked_sums told that count,
    computed on one thread: the reference's order, whatever this process's thread count."""
    generator = torch.Generator().manual_seed(numel + threads)
    values = torch.randn(2, numel, generator=generator)
    masks = torch.rand(3, numel, generator=generator) < 0.4
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        want = torch.stack([torch.stack([torch.sum(v * m) for m in masks]) for v in values])
        torch.set_num_threads(1)
        got = utils.masked_sums(values, masks, threads)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got, want)
    one_thread = utils.masked_sums(values, masks, 1)
    if threads > 1 and numel > utils.TORCH_GRAIN:  # the order does change the last bits
        assert not torch.equal(one_thread, want)


@pytest.mark.parametrize('n', [2, 3, 5])
def test_update_runs_for_any_n_and_keeps_rows_sorted(n):
    _, weights, centers = resnet8_with_centers(n, seed=n)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    members = utils.quped_update(weights, centers, x, y, lr1=0.1, lr2=1e-2, lam=1e-3, lam2=1e-3)
    assert members.shape == (6, n)
    assert members.sum(1).tolist() == [float(k) for k in weights.numels]
    assert torch.equal(centers, centers.sort(dim=1).values)
