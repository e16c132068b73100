import pytest
import torch

from mkt_torchrec.modules.sequence import DINAttention, MultiHeadTargetAttention


@pytest.mark.parametrize("make", [lambda: DINAttention(8, [16]), lambda: DINAttention(8, [16], normalize=False),
                                  lambda: MultiHeadTargetAttention(8, 2)])
def test_padding_never_changes_the_result_and_empty_gives_zero(make):
    torch.manual_seed(0)
    att = make().eval()
    b, l_short, l_long, d = 6, 5, 12, 8
    lengths = torch.tensor([5, 3, 1, 0, 4, 2])
    q = torch.randn(b, d)
    keys = torch.randn(b, l_short, d) * (torch.arange(l_short) < lengths.unsqueeze(1)).unsqueeze(-1)
    long = torch.cat([keys, torch.zeros(b, l_long - l_short, d)], dim=1)
    garbage = long.clone()
    for i, n in enumerate(lengths.tolist()):
        garbage[i, n:] = torch.randn(l_long - n, d) * 100  # whatever sits in the padding
    with torch.no_grad():
        a, c, g = att(q, keys, lengths), att(q, long, lengths), att(q, garbage, lengths)
    torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a, g, rtol=1e-6, atol=1e-6)
    assert torch.isfinite(a).all()
    assert torch.equal(a[3], torch.zeros(d))  # the empty sequence


def test_din_output_is_a_convex_combination_of_valid_keys():
    torch.manual_seed(1)
    att = DINAttention(4, [8])
    keys = torch.eye(4).unsqueeze(0).repeat(2, 1, 1)  # keys are unit vectors: output = attention weights
    out = att(torch.randn(2, 4), keys, torch.tensor([4, 2]))
    torch.testing.assert_close(out.sum(-1), torch.ones(2), rtol=1e-5, atol=1e-6)
    assert (out >= 0).all() and torch.equal(out[1, 2:], torch.zeros(2))


def test_din_sum_weights_are_the_raw_scores_so_repeats_add_up():
    torch.manual_seed(2)
    att = DINAttention(4, [8], normalize=False)
    q, k = torch.randn(1, 4), torch.randn(1, 1, 4)
    once = att(q, k, torch.tensor([1]))
    thrice = att(q, k.repeat(1, 3, 1), torch.tensor([3]))
    torch.testing.assert_close(thrice, 3 * once)  # the interest's intensity grows with matching behaviours
    score = att.score(torch.cat([q, k[:, 0], q - k[:, 0], q * k[:, 0]], dim=-1))  # (1, 1)
    torch.testing.assert_close(once, score * k[:, 0])
    softmaxed = DINAttention(4, [8])
    softmaxed.load_state_dict(att.state_dict())
    torch.testing.assert_close(softmaxed(q, k.repeat(1, 3, 1), torch.tensor([3])), k[:, 0])  # a mean: no count


def test_make_attention_builds_each_encoder_and_names_the_choices():
    from mkt_torchrec.modules.sequence import make_attention

    assert make_attention("din", 8, [4], 2).normalize and not make_attention("din_sum", 8, [4], 2).normalize
    with pytest.raises(ValueError, match="'din', 'din_sum' or 'mha'"):
        make_attention("lstm", 8, [4], 2)


def test_empty_sequence_has_finite_gradients():
    att = MultiHeadTargetAttention(8, 2)
    q = torch.randn(3, 8, requires_grad=True)
    out = att(q, torch.randn(3, 4, 8), torch.tensor([0, 0, 2]))
    out.sum().backward()
    assert torch.isfinite(q.grad).all()
