"""The concept bank, the concept-wise contrastive loss and the EMA update (METHOD.md section 2)
against the loop versions in cause_cli.model.slow, written the way the reference computes them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cause_cli.model.bank import ConceptBank
from cause_cli.model.contrastive import (
    ContrastiveSettings,
    _ConsideredLogSumExp,
    concept_contrastive_loss,
    concept_contrastive_terms,
)
from cause_cli.model.heads import SegmentationHeads
from cause_cli.model.ops import draw_grid_choice, grid_positions, nearest_code, take_tokens
from cause_cli.model.slow import LoopBank, entrywise_contrastive_loss, loop_contrastive_loss


def chronological(bank: ConceptBank, code: int) -> torch.Tensor:
    filled = int(bank.filled[code])
    if filled < bank.capacity:
        return bank.features[code, :filled]
    return bank.features[code].roll(-int(bank.next_slot[code]), dims=0)


@pytest.mark.parametrize("grows", [True, False])
@pytest.mark.parametrize(
    ("codes", "capacity", "steps", "tokens"), [(16, 100, 3, 64), (8, 5, 12, 80), (2048, 100, 4, 512)]
)
def test_ring_buffer_equals_growing_tensors(codes, capacity, steps, tokens, grows):
    """Every code's ring holds what the reference's growing tensors hold, whether the blocks
    are given as codes first keep entries (the CPU's form) or are all there (the GPU's)."""
    torch.manual_seed(codes + capacity)
    ring = ConceptBank(codes, 12, capacity, grows=grows)
    loop = LoopBank(codes, capacity)
    for _ in range(steps):
        code = torch.randint(0, codes, (tokens,))
        features = torch.randn(tokens, 12)
        keys = torch.rand(tokens)
        ring.update(code, features, keys)
        loop.update(code, features, keys)
    for index in range(codes):
        expected = loop.entries[index]
        if expected.numel() == 0:
            assert int(ring.filled[index]) == 0
        else:
            torch.testing.assert_close(chronological(ring, index), expected)


def test_full_bank_keeps_the_newest_entries():
    bank = ConceptBank(num_codes=2, feature_dim=3, capacity=4)
    for step in range(5):
        # code 0 gets 4 tokens (2 kept) per step, each step's features tagged by the step
        features = torch.tensor([[1.0, float(step), 0.0]] * 4)
        bank.update(torch.zeros(4, dtype=torch.long), features)
    assert int(bank.filled[0]) == 4 and int(bank.filled[1]) == 0
    steps_kept = sorted(round(v) for v in (chronological(bank, 0)[:, 1] / chronological(bank, 0)[:, 0]).tolist())
    assert steps_kept == [3, 3, 4, 4]


def test_random_half_per_code():
    bank = ConceptBank(num_codes=4, feature_dim=5, capacity=100)
    codes = torch.tensor([0] * 7 + [1] * 6 + [3] * 1)
    bank.update(codes, torch.randn(14, 5))
    assert bank.filled.tolist() == [3, 3, 0, 0]
    features, entry_codes = bank.entries()
    assert features.shape == (6, 5) and sorted(entry_codes.tolist()) == [0, 0, 0, 1, 1, 1]


def test_a_new_update_of_more_than_capacity_keeps_only_its_newest():
    torch.manual_seed(1)
    ring, loop = ConceptBank(1, 4, capacity=3), LoopBank(1, 3)
    codes = torch.zeros(20, dtype=torch.long)
    features, keys = torch.randn(20, 4), torch.rand(20)
    ring.update(codes, features, keys)
    loop.update(codes, features, keys)
    torch.testing.assert_close(chronological(ring, 0), loop.entries[0])


def contrastive_case(batch=3, tokens=16, dim=32, codes=2048, bank_size=500, seed=0):
    generator = torch.Generator().manual_seed(seed)
    codebook = F.normalize(torch.randn(codes, 8, generator=generator), dim=1)
    # Few distinct codes in the batch, so that positives, negatives and ignored pairs all occur.
    used = torch.randint(0, codes, (6,), generator=generator)
    token_codes = used[torch.randint(0, 6, (batch, tokens), generator=generator)]
    bank_codes = used[torch.randint(0, 6, (bank_size,), generator=generator)]
    student = torch.randn(batch, tokens, dim, generator=generator, requires_grad=True)
    teacher = torch.randn(batch, tokens, dim, generator=generator)
    bank = F.normalize(torch.randn(bank_size, dim, generator=generator), dim=1)
    return student, teacher, codebook[token_codes], bank, codebook[bank_codes]


@pytest.mark.parametrize("with_bank", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_vectorised_loss_equals_loop(with_bank, seed):
    settings = ContrastiveSettings()
    student, teacher, code_vectors, bank, bank_codes = contrastive_case(seed=seed)
    args = (bank, bank_codes) if with_bank else (None, None)
    expected = loop_contrastive_loss(student, teacher, code_vectors, *args, settings)
    (expected_grad,) = torch.autograd.grad(expected, student)
    actual = concept_contrastive_loss(student, teacher, code_vectors, *args, settings)
    (actual_grad,) = torch.autograd.grad(actual, student)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(actual_grad, expected_grad, rtol=1e-5, atol=1e-7)


def test_hand_computed_loss():
    # One image, three tokens. Codes: tokens 0 and 1 share a code, token 2 is orthogonal.
    code_vectors = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    student = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    teacher = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    settings = ContrastiveSettings(temperature=1.0)
    # Row 0: positive 1 (s = 1), negative 2 (s = 0): l = -1 + log(e + 1).
    # Row 1: positive 0 (s = 0), negative 2 (s = 1): l = 0 + log(1 + e).
    # Row 2: no positive (itself excluded). Mean over the two positive pairs:
    expected = (-1 + 2 * torch.log(torch.tensor(1 + torch.e))) / 2
    actual = concept_contrastive_loss(student, teacher, code_vectors, settings=settings)
    torch.testing.assert_close(actual, expected)


def test_masks_ignore_pairs_between_thresholds():
    # Code similarity 0.2 is neither positive (> 0.3) nor negative (< 0.1): such a candidate
    # must not change the loss, whatever its teacher feature.
    middle = torch.tensor([0.2, 0.2, (1 - 0.08) ** 0.5])
    code_vectors = torch.stack(
        [torch.tensor([1.0, 0.0, 0.0]), torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0]), middle]
    )[None]
    student = torch.randn(1, 4, 5)
    teacher = torch.randn(1, 4, 5)
    base = concept_contrastive_loss(student, teacher, code_vectors)
    teacher[0, 3] = torch.randn(5) * 10
    changed = concept_contrastive_loss(student, teacher, code_vectors)
    # Token 3's own row has no positive, and it is ignored in every other row.
    torch.testing.assert_close(base, changed)


def test_ema_update():
    torch.manual_seed(0)
    heads = SegmentationHeads(dim=6, reduced_dim=4, projection_dim=8, num_classes=3)
    with torch.no_grad():
        for parameter in heads.student_parameters():
            parameter.add_(torch.randn_like(parameter))
    teacher_before = [p.clone() for p in [*heads.teacher.parameters(), *heads.teacher_projection.parameters()]]
    student = [p.clone() for p in heads.student_parameters()]
    heads.update_teacher(0.99)
    teacher_after = [*heads.teacher.parameters(), *heads.teacher_projection.parameters()]
    for before, after, current in zip(teacher_before, teacher_after, student, strict=True):
        torch.testing.assert_close(after, 0.99 * before + 0.01 * current)
    assert all(not p.requires_grad for p in teacher_after)


def test_fast_step_equals_loop_step_with_a_full_bank():
    """Bank filled past capacity, then the loss against it: ring buffer + vectorised loss
    equals dict of tensors + per-image loop, at K = 2048."""
    torch.manual_seed(5)
    codes_total, dim = 2048, 16
    codebook = torch.randn(codes_total, 8)
    used = torch.randint(0, codes_total, (12,))
    ring, loop = ConceptBank(codes_total, dim, capacity=100), LoopBank(codes_total, 100)
    for _ in range(40):  # 40 steps x 256 tokens over 12 codes: every used code overflows its 100
        codes = used[torch.randint(0, 12, (256,))]
        features, keys = torch.randn(256, dim), torch.rand(256)
        ring.update(codes, features, keys)
        loop.update(codes, features, keys)
    assert int(ring.filled[used].min()) == 100
    normalised = F.normalize(codebook, dim=1)
    ring_features, ring_codes = ring.entries()
    loop_features, loop_vectors = loop.flat(codebook)
    assert ring_features.shape == loop_features.shape
    token_codes = used[torch.randint(0, 12, (4, 25))]
    student = torch.randn(4, 25, dim, requires_grad=True)
    teacher = torch.randn(4, 25, dim)
    fast = concept_contrastive_loss(student, teacher, normalised[token_codes], ring_features, normalised[ring_codes])
    slow = loop_contrastive_loss(student, teacher, normalised[token_codes], loop_features, loop_vectors)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)


def test_a_row_without_candidates_sends_back_no_nan():
    """One token per image (a small grid, grid-sampled): the first image's token has a
    positive, the second image's only candidate sits between the thresholds, so its row
    considers nothing. The loss and every gradient stay finite."""
    codes = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0]]), dim=1)  # cos 1 and 0.71
    code_vectors = codes[torch.tensor([[0], [2]])]  # [B=2, P=1, D]
    student = torch.randn(2, 1, 4, requires_grad=True)
    teacher = torch.randn(2, 1, 4)
    bank = F.normalize(torch.randn(1, 4), dim=1)
    bank_codes = codes[1:2]
    settings = ContrastiveSettings(positive_threshold=0.9, negative_threshold=0.1)
    loss = concept_contrastive_loss(student, teacher, code_vectors, bank, bank_codes, settings)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()


def _partly_filled_bank(seed: int, grows: bool = True) -> tuple[ConceptBank, torch.Tensor]:
    """A ring bank of 6 codes x 5 slots: two codes full, two partly filled, two empty, and
    garbage in the slots that hold nothing (they must not count)."""
    generator = torch.Generator().manual_seed(seed)
    bank = ConceptBank(6, 8, capacity=5, grows=grows)
    # Codes 3 and 2 keep entries first, so the blocks are not in code order.
    for codes in (torch.tensor([3] * 6 + [2] * 4), torch.tensor([0] * 14 + [1] * 10)):
        features = torch.randn(len(codes), 8, generator=generator)
        bank.update(codes, features, torch.rand(len(codes), generator=generator))
    assert bank.filled.tolist() == [5, 5, 2, 3, 0, 0]
    empty_slots = ~bank.valid_slots()
    read = bank.blocks[: len(empty_slots)]
    read[empty_slots] = torch.randn(int(empty_slots.sum()), 8, generator=generator) * 3
    code_vectors = F.normalize(torch.randn(6, 4, generator=generator), dim=1)
    return bank, code_vectors


@pytest.mark.parametrize(("compact", "grows"), [(False, True), (False, False), (True, True)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bank_by_code_equals_the_entrywise_matrices(seed, compact, grows):
    bank, code_vectors = _partly_filled_bank(seed, grows)
    generator = torch.Generator().manual_seed(10 + seed)
    token_codes = torch.randint(0, 6, (3, 7), generator=generator)
    student = torch.randn(3, 7, 8, generator=generator, requires_grad=True)
    teacher = torch.randn(3, 7, 8, generator=generator)
    settings = ContrastiveSettings(positive_threshold=0.2, negative_threshold=-0.1)
    entries, entry_codes = bank.entries()
    expected = entrywise_contrastive_loss(
        student, teacher, code_vectors[token_codes], entries, code_vectors[entry_codes], settings
    )
    (expected_grad,) = torch.autograd.grad(expected, student)
    values, defined = concept_contrastive_terms(
        student,
        code_vectors[token_codes],
        teacher,
        code_vectors[token_codes],
        0,
        bank.by_code(code_vectors, compact),
        settings,
    )
    actual = values[defined].mean()
    (actual_grad,) = torch.autograd.grad(actual, student)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(actual_grad, expected_grad, rtol=1e-5, atol=1e-7)


def test_considered_log_sum_exp_gradient_is_the_analytic_one():
    generator = torch.Generator().manual_seed(3)
    anchors = torch.randn(5, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    features = torch.randn(3, 2, 4, generator=generator, dtype=torch.float64)
    valid = torch.tensor([[True, True], [True, False], [False, False]])
    considered = (torch.rand(5, 3, generator=generator) > 0.4).to(torch.float64)
    considered[0] = 0  # a row that considers nothing gives 0 and sends back 0
    features.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, f: _ConsideredLogSumExp.apply(a, f, valid, considered, None), (anchors, features)
    )
    value = _ConsideredLogSumExp.apply(anchors, features, valid, considered, None).detach()
    weights = considered[:, :, None] * valid.to(torch.float64)  # [R, K, C]
    slow = torch.log((torch.einsum("re,kce->rkc", anchors, features).exp() * weights).sum(dim=(1, 2))).detach()
    nothing = (weights.sum(dim=(1, 2)) == 0).nonzero().flatten().tolist()
    assert nothing == [0, 4]  # row 4 considers only the empty code
    assert value[nothing].eq(0).all()
    some = [1, 2, 3]
    torch.testing.assert_close(value[some], slow[some])


@pytest.mark.parametrize("per_token", [True, False])
def test_the_bank_through_the_projection_gives_the_same_loss_and_gradients(per_token):
    """The student branch hands the loss the projection's inputs, and the teacher's tokens and
    the bank taken back through the projection; loss and every parameter's gradient equal
    those of the plain similarities ``a_i . b`` in E dimensions."""
    torch.manual_seed(7)
    heads = SegmentationHeads(dim=12, reduced_dim=6, projection_dim=10, num_classes=3, dropout=0.0,
                              kind="mlp" if per_token else "tr", num_queries=9)  # fmt: skip
    heads.set_clusterbook(torch.randn(6, 12))
    branch = heads.student_branch()
    _, code_vectors = _partly_filled_bank(4)
    bank = ConceptBank(6, 10, capacity=5)
    bank.update(torch.randint(0, 6, (60,)), torch.randn(60, 10), torch.rand(60))
    tokens, teacher = torch.randn(2, 9, 12), torch.randn(2, 9, 10)
    token_codes = torch.randint(0, 6, (2, 9))
    settings = ContrastiveSettings(positive_threshold=0.2, negative_threshold=-0.1)
    by_code = bank.by_code(code_vectors)

    def loss_and_gradients(through: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        candidates = [F.normalize(teacher.flatten(0, 1), dim=-1), by_code.features.flatten(0, 1)]
        student, inputs, projected = branch(tokens, candidates if through else ())
        used = by_code.through(None if projected is None else projected[1])
        values, defined = concept_contrastive_terms(
            student, code_vectors[token_codes], teacher, code_vectors[token_codes], 0, used, settings,
            inputs if through else None, None if projected is None else projected[0],
        )  # fmt: skip
        loss = values[defined].mean()
        return loss, torch.autograd.grad(loss, heads.student_parameters())

    plain_loss, plain_gradients = loss_and_gradients(False)
    fast_loss, fast_gradients = loss_and_gradients(True)
    torch.testing.assert_close(fast_loss, plain_loss, rtol=1e-5, atol=1e-6)
    for fast, plain in zip(fast_gradients, plain_gradients, strict=True):
        torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-6)


def test_an_empty_bank_through_the_projection_adds_no_term():
    heads = SegmentationHeads(dim=12, reduced_dim=6, projection_dim=10, num_classes=3, dropout=0.0)
    code_vectors = F.normalize(torch.randn(6, 4), dim=1)
    empty = ConceptBank(6, 10, capacity=5).by_code(code_vectors, compact=True)
    student, inputs, (projected_bank,) = heads.student_branch()(torch.randn(2, 9, 12), [empty.features.flatten(0, 1)])
    token_codes = torch.randint(0, 6, (2, 9))
    values, _ = concept_contrastive_terms(
        student, code_vectors[token_codes], torch.randn(2, 9, 10), code_vectors[token_codes], 0,
        empty.through(projected_bank), ContrastiveSettings(), inputs,
    )  # fmt: skip
    assert values.shape == (2,)


def test_considered_log_sum_exp_over_groups_sharing_codes():
    generator = torch.Generator().manual_seed(4)
    anchors = torch.randn(5, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    groups = torch.randn(4, 2, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    valid = torch.tensor([[True, True], [True, False], [True, True], [False, False]])
    group_codes = torch.tensor([0, 2, 0, 1])
    considered = (torch.rand(5, 3, generator=generator) > 0.4).to(torch.float64)
    assert torch.autograd.gradcheck(
        lambda a, g: _ConsideredLogSumExp.apply(a, g, valid, considered, group_codes), (anchors, groups)
    )
    value = _ConsideredLogSumExp.apply(anchors, groups, valid, considered, group_codes).detach()
    weights = considered[:, group_codes][:, :, None] * valid.to(torch.float64)  # [R, G, C]
    slow = torch.log((torch.einsum("re,gce->rgc", anchors, groups).exp() * weights).sum(dim=(1, 2))).detach()
    some = weights.sum(dim=(1, 2)) > 0
    torch.testing.assert_close(value[some], slow[some])
    assert value[~some].eq(0).all()


def test_tr_head_fused_attention_equals_the_explicit_weights():
    torch.manual_seed(8)
    heads = SegmentationHeads(dim=12, reduced_dim=6, projection_dim=10, num_classes=3, kind="tr", num_queries=9)
    heads.set_clusterbook(torch.randn(6, 12))
    head = heads.student.eval()
    tokens = torch.randn(2, 9, 12)
    explicit = head.decode(tokens, attention_weights=True)
    fused = head.decode(tokens, attention_weights=False)
    assert explicit["self_attn_weights"] is not None and fused["self_attn_weights"] is None
    torch.testing.assert_close(fused["output"], explicit["output"], rtol=1e-5, atol=1e-6)


def test_the_banks_checkpoint_holds_its_entries_only_and_restores_it_exactly():
    generator = torch.Generator().manual_seed(3)
    bank = ConceptBank(num_codes=50, feature_dim=16, capacity=10)
    for _ in range(4):
        codes = torch.randint(0, 6, (40,), generator=generator)
        bank.update(codes, torch.randn(40, 16, generator=generator), torch.rand(40, generator=generator))
    state = bank.state_dict()
    assert state["entries"].shape == (len(bank), 16) and "features" not in state  # not 50 x 10 x 16
    restored = ConceptBank(num_codes=50, feature_dim=16, capacity=10)
    restored.update(torch.arange(50).repeat(4), torch.randn(200, 16, generator=generator))  # overwritten
    restored.load_state_dict(state)
    assert torch.equal(restored.features, bank.features)
    assert torch.equal(restored.filled, bank.filled) and torch.equal(restored.next_slot, bank.next_slot)
    # And both go on alike.
    codes = torch.randint(0, 6, (40,), generator=generator)
    features, keys = torch.randn(40, 16, generator=generator), torch.rand(40, generator=generator)
    bank.update(codes, features, keys)
    restored.update(codes, features, keys)
    assert torch.equal(restored.features, bank.features)


@pytest.mark.parametrize("kind", ["mlp", "tr"])
def test_a_head_at_sampled_positions_gives_those_rows_of_its_full_output(kind):
    """Step two computes the heads at the grid-sampled tokens only; every token still attends
    to all the others in the TR head, so the rows equal the full output's at those positions."""
    torch.manual_seed(3)
    side, window, dim = 8, 4, 12
    heads = SegmentationHeads(dim=dim, reduced_dim=6, projection_dim=10, num_classes=3, dropout=0.1,
                              kind=kind, num_queries=side * side)  # fmt: skip
    heads.set_clusterbook(torch.randn(7, dim))
    heads.eval()
    tokens = torch.randn(3, side * side, dim)
    positions = grid_positions(draw_grid_choice(3, side, window), 3, side * side, window)
    assert positions.shape == (3, (side // window) ** 2)
    full = heads.student(tokens)
    at_positions = heads.student(tokens, positions=positions)
    torch.testing.assert_close(at_positions, take_tokens(full, positions), rtol=1e-5, atol=1e-6)
    codes = nearest_code(tokens, heads.student.clusterbook) if kind == "tr" else None
    given_codes = heads.student(tokens, positions=positions, token_codes=codes)
    torch.testing.assert_close(given_codes, at_positions)


@pytest.mark.parametrize("grows", [True, False])
def test_a_checkpoint_restores_into_either_layout_and_from_the_earlier_form(grows):
    """The checkpoint holds the entries code by code whatever order the blocks were given in,
    so it restores into the other layout too; an earlier version's checkpoint (every slot of
    every ring) restores the same rings."""
    generator = torch.Generator().manual_seed(5)
    bank = ConceptBank(8, 4, capacity=5, grows=grows)
    for codes in ([5, 5, 5, 2, 2], [0, 0, 7, 7, 7, 7], [2, 2, 2, 2]):  # blocks not in code order
        bank.update(torch.tensor(codes), torch.randn(len(codes), 4, generator=generator))
    other = ConceptBank(8, 4, capacity=5, grows=not grows)
    other.load_state_dict(bank.state_dict())
    assert torch.equal(other.features, bank.features)
    earlier = ConceptBank(8, 4, capacity=5, grows=grows)
    earlier.load_state_dict({"features": bank.features, "filled": bank.filled, "next_slot": bank.next_slot})
    assert torch.equal(earlier.features, bank.features) and torch.equal(earlier.next_slot, bank.next_slot)
