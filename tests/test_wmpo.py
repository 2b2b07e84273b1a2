"""wmpo.py: the policy, codec, world model, reward model and GRPO pieces, checked against their definitions."""

import dataclasses
import itertools
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from einops import repeat

import envs
import wmpo


def tiny_policy(seed=0, sampling="independent"):
    torch.manual_seed(seed)
    return wmpo.VLA(wmpo.PolicyConfig(width=8, keypoints=8, text_dim=16, hidden=64, sampling=sampling))


def frames(b, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 64, 64, 3), dtype=torch.uint8, generator=g)


# -- tokenizer and action bins -------------------------------------------------------------------------------


def test_tokenizer_round_trip_and_unknown_words():
    text = "push the red block onto the green pad"
    ids = wmpo.tokenize([text, "grab the purple banana"], wmpo.VOCAB)
    assert wmpo.detokenize(ids[:1], wmpo.VOCAB) == [text]
    assert (ids[1, :4] == torch.tensor([wmpo.UNK, wmpo.VOCAB.index("the"), wmpo.UNK, wmpo.UNK])).all()
    # every instruction the tasks can produce is fully in the vocabulary
    for task in envs.TASKS:
        env = envs.make(task)
        for s in range(20):
            env.reset(seed=s)
            assert wmpo.UNK not in wmpo.tokenize([env.unwrapped.instruction], wmpo.VOCAB)[0].tolist()


def test_action_bins_round_trip_within_half_a_bin():
    a = torch.rand(1000, 2) * 2 - 1
    back = wmpo.tokens_to_action(wmpo.action_to_tokens(a))
    assert (back - a).abs().max() <= 1 / 255 + 1e-6  # half of a bin of width 2 / 255
    assert wmpo.action_to_tokens(torch.tensor([-1.0, 1.0, 3.0])).tolist() == [0, 255, 255]


def test_hl_gauss_targets_are_the_gaussian_mass_of_each_bin():
    bins, sigma = 16, 0.75
    tokens = torch.tensor([0, 3, 7, 15])
    got = wmpo.gauss_targets(tokens, bins, sigma)
    x = torch.linspace(-0.5, bins - 0.5, bins * 2000 + 1, dtype=torch.float64)  # numerical integral of the pdf
    for t, row in zip(tokens.tolist(), got):
        pdf = torch.exp(-0.5 * ((x - t) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
        mass = torch.stack([torch.trapezoid(pdf[i * 2000 : (i + 1) * 2000 + 1], x[i * 2000 : (i + 1) * 2000 + 1])
                            for i in range(bins)])
        torch.testing.assert_close(row.double(), mass / mass.sum(), atol=1e-6, rtol=1e-4)
        assert row.argmax() == t
    # the SFT loss with these targets, and one-hot as sigma -> 0
    pol, f = tiny_policy(), frames(2)
    w = wmpo.tokenize(["go to the red pad"] * 2, wmpo.VOCAB)
    tok, m = torch.randint(0, 256, (2, 16)), torch.ones(2, 16, dtype=torch.bool)
    logp = pol.logits(f, w).log_softmax(-1)
    q = wmpo.gauss_targets(tok, 256, 1.5)
    torch.testing.assert_close(pol(f, w, tok, m, sigma=1.5)[0], -(q * logp).sum(-1).mean())
    torch.testing.assert_close(pol(f, w, tok, m, sigma=1e-3)[0], pol(f, w, tok, m)[0])


# -- policy ------------------------------------------------------------------------------------------------------


def test_logprob_is_sum_of_token_log_softmax():
    pol = tiny_policy()
    f, w = frames(4), wmpo.tokenize(["push the red block onto the green pad"] * 4, wmpo.VOCAB)
    torch.manual_seed(1)
    actions, tokens, logp = pol.act(f, w, temperature=1.6)
    logits = pol.logits(f, w) / 1.6
    expect = torch.stack([sum(F.log_softmax(logits[b, n], -1)[tokens[b, n]] for n in range(16)) for b in range(4)])
    torch.testing.assert_close(logp, expect, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(pol.logprob(f, w, tokens, 1.6), expect, atol=1e-4, rtol=1e-5)
    assert actions.shape == (4, 8, 2) and tokens.shape == (4, 16)
    torch.testing.assert_close(actions.reshape(4, 16), wmpo.tokens_to_action(tokens))


def ar_policy(seed=0):
    torch.manual_seed(seed)
    pol = wmpo.VLA(wmpo.PolicyConfig(chunk=2, bins=3, width=8, keypoints=8, text_dim=16, hidden=64,
                                     decoding="autoregressive"))
    torch.nn.init.normal_(pol.prev.weight, std=1.0)  # earlier tokens change later ones (zero at initialisation)
    return pol


def test_autoregressive_decoding_is_a_distribution_over_whole_chunks():
    pol, T = ar_policy(), 0.8
    f, w = frames(2), wmpo.tokenize(["go to the red pad"] * 2, wmpo.VOCAB)
    combos = torch.tensor(list(itertools.product(range(3), repeat=4)))  # every chunk of 2 actions x 2 dims x 3 bins
    for i in range(2):
        lp = pol.logprob(f[i : i + 1].expand(81, -1, -1, -1), w[i : i + 1].expand(81, -1), combos, T).detach()
        assert abs(lp.exp().sum().item() - 1) < 1e-5  # a token that saw itself or a later one would break this
        # the sequential sampler (act) draws each whole chunk at the probability the teacher-forced pass gives it
        n = 20_000
        torch.manual_seed(i)
        _, tokens, logp = pol.act(f[i : i + 1].expand(n, -1, -1, -1), w[i : i + 1].expand(n, -1), T)
        freq = (tokens[:, None] == combos[None]).all(-1).float().mean(0)
        assert (freq - lp.exp()).abs().max() < 0.015  # 4 standard errors of the largest probability at 20,000 draws
        torch.testing.assert_close(logp[:100], lp[(tokens[:100, None] == combos[None]).all(-1).float().argmax(1)])
    # causal: changing token j changes no logits of tokens 0..j
    t = combos[:1].repeat(4, 1)
    for j in range(4):
        t2 = t[:1].clone()
        t2[0, j] = 2
        a, b = pol.logits(f[:1], w[:1], t[:1]), pol.logits(f[:1], w[:1], t2)
        assert torch.equal(a[:, : j + 1], b[:, : j + 1]) and (j == 3 or not torch.equal(a[:, j + 1 :], b[:, j + 1 :]))
    g1, g2 = pol.act(f, w, 0.0)[1], pol.act(f, w, 0.0)[1]
    assert torch.equal(g1, g2)


def shared_dim_probs(p):
    """Reference for shared sampling, by enumeration: one action dimension's K token distributions p (k, v), read
    at one uniform u -> {tuple of K tokens: probability}, from the segments between every CDF breakpoint."""
    cdf = p.double().cumsum(-1)
    cuts = torch.cat([torch.zeros(1, dtype=torch.float64), cdf.flatten(), torch.ones(1, dtype=torch.float64)]).sort()[0]
    out = {}
    for lo, hi in zip(cuts[:-1].tolist(), cuts[1:].tolist()):
        if hi > lo:
            mid = (lo + hi) / 2
            key = tuple(int((cdf[k] <= mid).sum()) for k in range(len(p)))
            out[key] = out.get(key, 0.0) + hi - lo
    return out


def test_shared_sampling_is_exact_and_keeps_every_tokens_marginal():
    torch.manual_seed(0)
    pol = wmpo.VLA(wmpo.PolicyConfig(chunk=2, bins=3, width=8, keypoints=8, text_dim=16, hidden=64, sampling="shared"))
    torch.nn.init.normal_(pol.head[-1].bias, std=1.0)  # distinct, non-uniform distributions per token
    T, f, w = 0.8, frames(1), wmpo.tokenize(["go to the red pad"], wmpo.VOCAB)
    combos = torch.tensor(list(itertools.product(range(3), repeat=4)))  # (k a) order: x0 y0 x1 y1
    lp = pol.logprob(f.expand(81, -1, -1, -1), w.expand(81, -1), combos, T).detach()
    p = (pol.logits(f, w)[0] / T).softmax(-1).detach()  # (k*a, v)
    ref = [shared_dim_probs(p[a::2]) for a in range(2)]
    expect = torch.tensor([ref[0].get((c[0], c[2]), 0.0) * ref[1].get((c[1], c[3]), 0.0) for c in combos.tolist()],
                          dtype=torch.float64)
    torch.testing.assert_close(lp.exp().double(), expect, atol=1e-6, rtol=0)
    assert abs(expect.sum().item() - 1) < 1e-6 and (expect == 0).sum() > 0  # some chunks cannot be drawn together
    n = 20_000
    torch.manual_seed(1)
    _, tokens, logp = pol.act(f.expand(n, -1, -1, -1), w.expand(n, -1), T)
    freq = (tokens[:, None] == combos[None]).all(-1).double().mean(0)
    assert (freq - expect).abs().max() < 0.015  # the sampler draws each chunk at its exact probability
    marg = torch.stack([(tokens == v).double().mean(0) for v in range(3)], -1)  # (k*a, v): each token on its own
    assert (marg - p.double()).abs().max() < 0.015
    torch.testing.assert_close(logp[:100], lp[(tokens[:100, None] == combos[None]).all(-1).float().argmax(1)])
    # a masked token constrains nothing: with chunk step 1 masked, a dimension's probability is step 0's token's
    mask = torch.tensor([[True, True, False, False]]).expand(81, -1)
    lp0 = pol.logprob(f.expand(81, -1, -1, -1), w.expand(81, -1), combos, T, per_token=True, mask=mask).detach()
    torch.testing.assert_close(lp0, p[:2].log()[torch.arange(2), combos[:, :2]], atol=1e-5, rtol=0)


def test_greedy_is_deterministic_and_argmax():
    pol = tiny_policy()
    f, w = frames(3), wmpo.tokenize(["go to the red pad"] * 3, wmpo.VOCAB)
    a1, t1, _ = pol.act(f, w, 0.0)
    a2, t2, _ = pol.act(f, w, 0.0)
    assert torch.equal(t1, t2) and torch.equal(a1, a2)
    assert torch.equal(t1, pol.logits(f, w).argmax(-1))


def test_instruction_changes_the_policy_output():
    pol = tiny_policy()
    for p in pol.parameters():
        p.data += 0.05 * torch.randn_like(p)  # FiLM starts at identity: perturb so words can matter
    f = frames(1)
    la = pol.logits(f, wmpo.tokenize(["push the red block onto the green pad"], wmpo.VOCAB))
    lb = pol.logits(f, wmpo.tokenize(["push the blue block onto the green pad"], wmpo.VOCAB))
    assert not torch.allclose(la, lb)


def test_text_encoder_runs_repeated_instructions_once_with_the_same_values_and_gradients():
    enc = tiny_policy().text
    texts = ["push the red block onto the green pad", "reach the blue pad", "push the red block onto the green pad",
             "reach the blue pad", "push the blue block onto the red pad then the red block onto the blue pad"]
    ids = wmpo.tokenize(texts, wmpo.VOCAB)
    w = torch.randn(len(texts), 16)
    (enc(ids) * w).sum().backward()  # the batch, repeats encoded once
    batch = {n: p.grad.clone() for n, p in enc.named_parameters()}
    enc.zero_grad()
    rows = torch.cat([enc(ids[i : i + 1]) for i in range(len(texts))])  # reference: one instruction at a time
    (rows * w).sum().backward()
    assert torch.allclose(enc(ids), rows, atol=1e-6)
    for n, p in enc.named_parameters():
        assert torch.allclose(batch[n], p.grad, atol=1e-5), n

@pytest.mark.parametrize("decoding", ["parallel", "autoregressive"])
def test_sft_overfits_a_handful_of_demos(decoding):
    eps = envs.collect("wmpo/Reach-v0", envs.expert_policy(), [1, 2, 3], num_envs=3)
    from train_policy import chunk_targets

    f, w, t, m = chunk_targets(eps, 8, 256, wmpo.VOCAB)
    torch.manual_seed(0)
    pol = wmpo.VLA(wmpo.PolicyConfig(width=8, keypoints=8, text_dim=16, hidden=64, decoding=decoding))
    opt = torch.optim.AdamW(pol.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        loss, logs = pol(f, w, t, m)
        first = first or loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first, (first, loss.item())


# -- checkpoints ---------------------------------------------------------------------------------------------------


def test_checkpoint_round_trip_and_clear_errors(tmp_path):
    pol = tiny_policy()
    path = str(tmp_path / "p.safetensors")
    wmpo.save(pol, path, step=7)
    back = wmpo.load(path, expect="VLA")
    assert back.step == 7 and back.cfg == pol.cfg
    f, w = frames(2), wmpo.tokenize(["go to the red pad"] * 2, wmpo.VOCAB)
    assert torch.equal(back.logits(f, w), pol.logits(f, w))
    with pytest.raises(ValueError, match="expected a WorldModel"):
        wmpo.load(path, expect="WorldModel")
    # truncated file
    bad = str(tmp_path / "bad.safetensors")
    open(bad, "wb").write(open(path, "rb").read()[:500])
    with pytest.raises(ValueError, match="bad.safetensors"):
        wmpo.load(bad)
    # weights that do not match the config in the metadata
    from safetensors.torch import load_file, save_file

    state = load_file(path)
    state["head.4.weight"] = state["head.4.weight"][:10]
    meta = wmpo.read_meta(path)
    mism = str(tmp_path / "mism.safetensors")
    save_file(state, mism, metadata=meta)
    with pytest.raises(ValueError, match="head.4.weight"):
        wmpo.load(mism)
    # a checkpoint written before vocabularies were saved with it: one clear error, not silently re-mapped words
    old = str(tmp_path / "old.safetensors")
    save_file(load_file(path), old, metadata={k: v for k, v in meta.items() if k != "vocab"})
    with pytest.raises(ValueError, match="no vocabulary"):
        wmpo.load(old)


def test_checkpoint_keeps_its_vocabulary_when_the_templates_grow(tmp_path, monkeypatch):
    """Issue 15: adding a task's words re-sorts the module vocabulary; an old checkpoint must keep its own ids."""
    text = "push the red block onto the green pad"
    pol = tiny_policy()
    path = str(tmp_path / "p.safetensors")
    wmpo.save(pol, path)
    f = frames(2)
    before = pol.logits(f, pol.text.tokenize([text] * 2))
    # a new word that sorts first shifts every id by one in a freshly built vocabulary
    grown = ["<pad>", "<unk>"] + sorted(set(wmpo.VOCAB[2:]) | {"aardvark"})
    monkeypatch.setattr(wmpo, "VOCAB", grown)
    assert wmpo.tokenize([text], grown)[0, 0] != wmpo.tokenize([text], pol.text.words)[0, 0]
    back = wmpo.load(path)
    assert back.text.words == pol.text.words  # the checkpoint's list, not today's
    assert back.text.tokenize([text]).tolist() == pol.text.tokenize([text]).tolist()
    assert wmpo.detokenize(back.text.tokenize([text]), back.text.words) == [text]
    assert torch.equal(back.logits(f, back.text.tokenize([text] * 2)), before)
    wmpo.save(back, str(tmp_path / "q.safetensors"))  # and it saves its own list again
    assert wmpo.load(str(tmp_path / "q.safetensors")).text.words == pol.text.words


# -- world model ---------------------------------------------------------------------------------------------------

WM_CFG = wmpo.WorldModelConfig(width=16, d=32, n_head=1, n_layer=1)


def random_wm(seed=0, scale=0.05, **cfg):
    torch.manual_seed(seed)
    wm = wmpo.WorldModel(dataclasses.replace(WM_CFG, **cfg))
    for p in wm.parameters():
        p.data += scale * torch.randn_like(p)  # leave the zero init so every path matters
    return wm


def test_world_model_loss_is_finite_and_cached_unroll_equals_full_pass():
    # the KV-cache rollout (frame_attention_rollout, one frame at a time) must give exactly what one frame-causal
    # pass (frame_attention) over the same frames gives: feed the unroll's own predictions back as a sequence
    wm = random_wm()
    z = torch.randn(2, 12, 8, 16, 16).tanh()
    a = torch.rand(2, 12, 2) * 2 - 1
    for unroll in [0, 2, 8]:
        loss, logs = wm(z, a, unroll)
        loss.backward()
        assert math.isfinite(loss.item()) and all(torch.isfinite(p.grad).all() for p in wm.parameters() if p.grad is not None)
    C = WM_CFG.context
    with torch.no_grad():
        preds = wm.predict(z[:, :C], a[:, : C - 1], a[:, C - 1 : C + 7])  # (2, 8, c, h, w)
        seq = torch.cat([z[:, :C], preds[:, :-1]], 1)  # the 11 frames the unroll saw as inputs
        prev = torch.cat([seq[:, :1], seq[:, :-1]], 1)
        full, _ = wm.next_latents(seq, prev, wm.action_features(a[:, : C + 7]))
    assert preds.shape == (2, 8, 8, 16, 16)
    torch.testing.assert_close(full[:, C - 1 :], preds, atol=1e-5, rtol=1e-4)


def test_frame_causal_later_frames_never_change_earlier_predictions():
    wm = random_wm()
    z = torch.randn(1, 10, 8, 16, 16).tanh()
    a = torch.rand(1, 10, 2) * 2 - 1
    prev = torch.cat([z[:, :1], z[:, :-1]], 1)
    p1, _ = wm.next_latents(z, prev, wm.action_features(a))
    z2, a2 = z.clone(), a.clone()
    z2[:, 6:] = -z2[:, 6:]
    a2[:, 6:] = -a2[:, 6:]
    prev2 = torch.cat([z2[:, :1], z2[:, :-1]], 1)
    p2, _ = wm.next_latents(z2, prev2, wm.action_features(a2))
    torch.testing.assert_close(p1[:, :6], p2[:, :6], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(p1[:, 6:], p2[:, 6:])


def blob_episode(start, actions):
    """A 16x16 latent 'pusher' (one bright cell in channel 0) that moves one cell per step in the action's sign."""
    pos = torch.tensor(start)
    z = [pos.clone()]
    for act in actions:
        pos = (pos + torch.sign(act).long()).clamp(0, 15)
        z.append(pos.clone())
    lat = torch.full((len(z), 8, 16, 16), -0.5)
    for t, (r, c) in enumerate(z):
        lat[t, 0, r, c] = 0.9
    return lat


def blob_position(lat):  # (t, c, h, w) -> (t, 2) row, col of channel 0's maximum
    flat = lat[:, 0].flatten(1).argmax(1)
    return torch.stack([flat // 16, flat % 16], 1)


@pytest.mark.slow
def test_actions_move_the_pusher_after_a_short_overfit(monkeypatch):
    # different action chunks from one context must put the "pusher" in different, correct places
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # 150 training steps: the PyTorch reference, not the interpreter
    torch.manual_seed(0)
    wm = wmpo.WorldModel(WM_CFG)
    opt = torch.optim.AdamW(wm.parameters(), lr=3e-3)
    for step in range(150):
        zs, acts = [], []
        for _ in range(8):
            a = torch.randint(-1, 2, (12, 2)).float()
            zs.append(blob_episode(torch.randint(5, 11, (2,)).tolist(), a[:-1]))
            acts.append(a)
        loss, _ = wm(torch.stack(zs), torch.stack(acts), unroll=0 if step < 100 else 4)
        opt.zero_grad()
        loss.backward()
        opt.step()
    ctx = blob_episode([8, 8], torch.zeros(3, 2))[None]  # at rest for 4 frames
    chunks = {"down-right": torch.ones(8, 2), "up-left": -torch.ones(8, 2)}
    end = {}
    for name, chunk in chunks.items():
        pred = wm.predict(ctx, torch.zeros(1, 3, 2), chunk[None])[0]
        end[name] = blob_position(pred)[3].tolist()  # after 4 steps
    assert end["down-right"] == [12, 12] and end["up-left"] == [4, 4]


def test_load_world_round_trip(tmp_path):
    torch.manual_seed(0)
    codec = wmpo.FrameCodec(wmpo.CodecConfig(width=8))
    wm = random_wm()
    wmpo.save(codec, str(tmp_path / "codec.safetensors"))
    wmpo.save(wm, str(tmp_path / "wm.safetensors"))
    world = wmpo.load_world(str(tmp_path))
    direct = wmpo.WorldModelEnv(wm.eval(), codec.eval())
    f0, acts = frames(2), torch.rand(2, 8, 2) * 2 - 1
    world.reset(f0, ["push the red block onto the green pad"] * 2)
    direct.reset(f0, ["push the red block onto the green pad"] * 2)
    out = world.step(acts)
    assert world.chunk == 8 and out.shape == (2, 8, 64, 64, 3) and out.dtype == torch.uint8
    assert torch.equal(out, direct.step(acts))
    with pytest.raises(SystemExit, match="train_wm.py"):
        wmpo.load_world(str(tmp_path / "nothing"))


# E = 2 splits across a chunk boundary: test_training_unroll_and_imagination_take_one_path
@pytest.mark.parametrize("split", [[3, 5, 1, 7, 4]])
def test_step_splits_give_the_same_frames_as_one_unroll(split):
    # GRPO steps E actions at a time; the frames must be those of one call (the path training unrolls), and inside
    # a chunk they must be WorldModel.unroll's own prediction decoded (no context restart, no re-encoding)
    torch.manual_seed(0)
    codec, wm = wmpo.FrameCodec(wmpo.CodecConfig(width=8)).eval(), random_wm().eval()
    world = wmpo.WorldModelEnv(wm, codec)
    f0, acts = frames(2), torch.rand(2, 20, 2) * 2 - 1
    world.reset(f0, ["go to the red pad"] * 2)
    ref = world.step(acts)
    world.reset(f0, ["go to the red pad"] * 2)
    starts = [sum(split[:i]) for i in range(len(split))]
    out = torch.cat([world.step(acts[:, s : s + n]) for s, n in zip(starts, split)], 1)
    assert out.shape == (2, 20, 64, 64, 3) and torch.equal(out, ref)
    z0 = repeat(codec.encode(f0), "b c h w -> b t c h w", t=WM_CFG.context)
    z = wm.predict(z0, torch.zeros(2, WM_CFG.context - 1, 2), acts[:, : WM_CFG.chunk])
    direct = torch.stack([codec.to_uint8(codec.decode(z[:, j])) for j in range(WM_CFG.chunk)], 1)
    assert (out[:, : WM_CFG.chunk].int() - direct.int()).abs().max() <= 1  # same latents, decoded one by one
    # a later action never changes an earlier frame
    world.reset(f0, ["go to the red pad"] * 2)
    other = acts.clone()
    other[:, 11:] = -other[:, 11:]
    assert torch.equal(world.step(other)[:, :11], ref[:, :11])


@pytest.mark.parametrize("context_from", ["frames", "latents"])
def test_training_unroll_and_imagination_take_one_path(context_from):
    # train_wm.py's unrolled loss runs WorldModel.imagine over windows of several chunks; GRPO's imagination runs
    # WorldModelEnv.step, E actions at a time. Across chunk boundaries both must make the same next context (the
    # re-encoded frames or the model's own latents), so what is trained is exactly what is imagined.
    torch.manual_seed(0)
    codec, wm = wmpo.FrameCodec(wmpo.CodecConfig(width=8)).eval(), random_wm(context_from=context_from).eval()
    C, K = WM_CFG.context, WM_CFG.chunk
    f0, acts = frames(2), torch.rand(2, K + 3, 2) * 2 - 1  # across one chunk boundary
    world = wmpo.WorldModelEnv(wm, codec)
    world.reset(f0, ["go to the red pad"] * 2)
    stepped = torch.cat([world.step(acts[:, s : s + 2]) for s in range(0, acts.shape[1], 2)], 1)
    z0 = repeat(codec.encode(f0), "b c h w -> b t c h w", t=C)  # a rollout's start: frame 0 at rest
    z = wm.predict(z0, torch.zeros(2, C - 1, 2), acts, codec=codec)
    trained = codec.to_uint8(codec.decode(z))
    assert (stepped.int() - trained.int()).abs().max() <= 1
    # the boundary is a real choice: the other one gives other frames after the first chunk
    other = random_wm(context_from="latents" if context_from == "frames" else "frames").eval()
    z_other = other.predict(z0, torch.zeros(2, C - 1, 2), acts, codec=codec)
    assert torch.equal(z_other[:, :K], z[:, :K]) and (z_other[:, K:] - z[:, K:]).abs().max() > 1e-3
    # training's gradient crosses the chunk boundary (through the frozen codec, rounding straight-through): the
    # second chunk sees the window's real context only through the first chunk's predictions (C < K)
    ctx = z0.detach().requires_grad_(True)
    wm.imagine(ctx, torch.zeros(2, C - 1, 2), acts, codec=codec)[:, K:].square().sum().backward()
    assert ctx.grad.abs().sum() > 0
    zw, aw = torch.randn(2, C + K + 3, 8, 16, 16).tanh(), torch.rand(2, C + K + 3, 2) * 2 - 1
    assert math.isfinite(wm(zw, aw, K, codec)[0].item())
    if context_from == "frames":
        with pytest.raises(ValueError, match="pass the codec"):
            wm(zw, aw, K)


@pytest.mark.parametrize("motion", [0.0, 0.5])
def test_windows_weigh_tasks_equally_and_motion_windows_hold_the_block_moving(motion):
    # one Reach episode against nine PushCube ones: GRPO's batch weighs the tasks equally, so must the windows
    np.random.seed(0)
    eps, latents, C, K = [], [], 2, 4
    for i in range(10):
        task = "wmpo/Reach-v0" if i == 0 else "wmpo/PushCube-v0"
        names = envs.object_layout(task)[0]
        pos = np.zeros((40, len(names), 3), np.float32)
        blocks = [r for r, n in enumerate(names) if n.startswith("block_")]
        if blocks:  # the block moves between frames 20 and 25
            pos[:, blocks[0], 0] = 0.01 * np.clip(np.arange(40) - 20, 0, 5)
        eps.append({"task": task, "object_pos": pos})
        latents.append(100.0 * i + repeat(torch.arange(40.0), "t -> t 1 2 2"))  # episode i, frame t
    w = wmpo.Windows(latents, [torch.zeros(40, 2)] * 10, eps, C, K, motion=motion)
    z, a = w.sample(2000)
    assert z.shape == (2000, C + K, 1, 2, 2) and a.shape == (2000, C + K, 2)
    episode, frame = z[:, :, 0, 0, 0] // 100, z[:, :, 0, 0, 0] % 100  # (b, t)
    assert abs((episode[:, 0] == 0).float().mean().item() - 0.5) < 0.05  # frames uniformly would give 0.1
    moving = ((frame[:, C:] >= 21) & (frame[:, C:] <= 25)).any(1)  # a target frame right after the block moved
    push_motion = moving[:1000][episode[:1000, 0] > 0].float().mean().item()
    assert push_motion == 1.0 if motion else push_motion < 0.4, push_motion


def test_world_model_env_matches_real_chunk_env_shapes():
    torch.manual_seed(0)
    codec = wmpo.FrameCodec(wmpo.CodecConfig(width=8))
    wm = wmpo.WorldModel(WM_CFG)
    real = envs.RealChunkEnv("wmpo/PushCube-v0", 2)
    f0 = real.reset([1, 2])
    imag = wmpo.WorldModelEnv(wm, codec)
    f0_i = imag.reset(f0, real.instructions)
    acts = torch.rand(2, 8, 2) * 2 - 1
    fr, fi = real.step(acts), imag.step(acts)
    real.close()
    assert f0.shape == f0_i.shape == (2, 64, 64, 3)
    assert fr.shape == fi.shape == (2, 8, 64, 64, 3) and fr.dtype == fi.dtype == torch.uint8
    assert real.success.shape == (2, 9)


def test_imagined_env_is_a_gymnasium_env_judged_by_the_reward_model(tmp_path):
    from gymnasium.utils.env_checker import check_env

    torch.manual_seed(0)
    wmpo.save(wmpo.FrameCodec(wmpo.CodecConfig(width=8)), str(tmp_path / "codec.safetensors"))
    wmpo.save(random_wm(), str(tmp_path / "wm.safetensors"))
    rm = wmpo.RewardModel(wmpo.RewardConfig(width=8, keypoints=4, text_dim=16, hidden=32))
    wmpo.save(rm, str(tmp_path / "reward.safetensors"))
    eps = envs.collect("wmpo/Reach-v0", envs.expert_policy(), [1, 2, 3])
    os.makedirs(tmp_path / "data")
    envs.save_episodes(str(tmp_path / "data" / "rollouts-reach-v0-0.safetensors"), eps)
    env = wmpo.ImaginedEnv(str(tmp_path), "wmpo/Reach-v0")
    check_env(env, skip_render_check=True)
    obs, info = env.reset(seed=5)
    assert any(np.array_equal(obs, e["frames"][0]) for e in eps) and info["success"] is False
    # each step's reward is the reward model's verdict on the clip ending at the new frame, as GRPO's judge sees it
    frames, n = [torch.from_numpy(obs)[None]], 0
    for t in range(envs.horizon("wmpo/Reach-v0") + 5):
        obs, r, term, trunc, info = env.step(np.array([0.5, -0.5], np.float32))
        frames.append(torch.from_numpy(obs)[None])
        words = rm.text.tokenize([env.instruction])
        expect = rm(torch.stack(frames, 1), words)[0, -1].item() >= rm.cfg.threshold
        assert info["success"] == expect and r == float(expect) and term == expect
        n += 1
        if term or trunc:
            break
    assert term or n == envs.horizon("wmpo/Reach-v0")  # truncated exactly at the task's horizon
    with pytest.raises(SystemExit, match="train_wm.py"):
        wmpo.ImaginedEnv(str(tmp_path / "empty"), "wmpo/Reach-v0")


# -- reward model ----------------------------------------------------------------------------------------------------


def test_detect_success_windows():
    probs = torch.tensor([[0.1, 0.2, 0.9, 0.3, 0.95], [0.1, 0.4, 0.5, 0.49, 0.2], [0.8, 0.1, 0.1, 0.1, 0.1]])
    success, first = wmpo.detect_success(probs, threshold=0.5)
    assert success.tolist() == [True, True, True]
    assert first.tolist() == [2, 2, 0]
    success, first = wmpo.detect_success(probs, threshold=0.85)
    assert success.tolist() == [True, False, False]
    assert first.tolist() == [2, 4, 4]  # no detection: the last frame, nothing masked


def test_reward_scores_every_frame_and_windows_are_causal():
    torch.manual_seed(0)
    rm = wmpo.RewardModel(wmpo.RewardConfig(width=8, keypoints=4, text_dim=16, hidden=32))
    f = torch.randint(0, 256, (2, 12, 64, 64, 3), dtype=torch.uint8)
    w = wmpo.tokenize(["go to the red pad"] * 2, wmpo.VOCAB)
    p = rm(f, w)
    assert p.shape == (2, 12) and ((p > 0) & (p < 1)).all()
    f2 = f.clone()
    f2[:, 9:] = 0  # the clip ending at frame 8 covers frames 1..8 only
    p2 = rm(f2, w)
    torch.testing.assert_close(p[:, :9], p2[:, :9])


# -- GRPO ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("decoding", ["parallel", "autoregressive"])
def test_grpo_step_moves_logprobs_in_the_sign_of_the_advantage(decoding):
    torch.manual_seed(0)
    pol = wmpo.VLA(wmpo.PolicyConfig(width=8, keypoints=8, text_dim=16, hidden=64, decoding=decoding))
    f, w = frames(8), wmpo.tokenize(["go to the red pad"] * 8, wmpo.VOCAB)
    torch.manual_seed(0)
    _, tokens, _ = pol.act(f, w, 1.0)
    adv = torch.tensor([1.0, -1.0] * 4)
    before = pol.logprob(f, w, tokens).detach()
    cfg = wmpo.GRPOConfig(lr=1e-3, minibatches=1, temperature=1.0)
    opt = torch.optim.AdamW(pol.parameters(), lr=cfg.lr)
    batch = {"obs": f, "words": w, "tokens": tokens, "adv": adv, "mask": torch.ones(8, dtype=torch.bool),
             "token_mask": torch.ones(8, 16, dtype=torch.bool)}
    logs = wmpo.grpo_update(pol, opt, batch, cfg)
    after = pol.logprob(f, w, tokens).detach()
    assert ((after - before)[adv > 0] > 0).all() and ((after - before)[adv < 0] < 0).all()
    assert logs["grpo/tokens"] == 8 * 16


def test_masked_chunks_get_no_gradient():
    pol = tiny_policy()
    f, w = frames(4), wmpo.tokenize(["go to the red pad"] * 4, wmpo.VOCAB)
    _, tokens, _ = pol.act(f, w, 1.0)
    cfg = wmpo.GRPOConfig(lr=1e-2, minibatches=1)
    # rows 2, 3 masked (after the success frame): giving them huge advantages must change nothing
    base = {"obs": f, "words": w, "tokens": tokens, "mask": torch.tensor([True, True, False, False]),
            "token_mask": torch.ones(4, 16, dtype=torch.bool)}
    states = []
    for adv_masked in [0.0, 100.0]:
        p = tiny_policy()
        p.load_state_dict(pol.state_dict())
        o = torch.optim.SGD(p.parameters(), lr=cfg.lr)
        wmpo.grpo_update(p, o, {**base, "adv": torch.tensor([1.0, -1.0, adv_masked, -adv_masked])}, cfg)
        states.append(torch.cat([q.detach().flatten() for q in p.parameters()]))
    assert torch.equal(states[0], states[1])


def test_grpo_with_shared_sampling_moves_a_chunk_in_the_sign_of_its_advantage():
    # the exact chunk probability is a width of CDF intervals (not smooth in bulk), so one chunk per update
    f, w = frames(1), wmpo.tokenize(["go to the red pad"], wmpo.VOCAB)
    for adv in [1.0, -1.0]:
        torch.manual_seed(0)
        pol = wmpo.VLA(wmpo.PolicyConfig(width=8, keypoints=8, text_dim=16, hidden=64, bins=16, sampling="shared"))
        _, tokens, _ = pol.act(f, w, 1.0)
        before = pol.logprob(f, w, tokens).item()
        batch = {"obs": f, "words": w, "tokens": tokens, "adv": torch.tensor([adv]), "mask": torch.ones(1, dtype=bool),
                 "token_mask": torch.ones(1, 16, dtype=torch.bool)}
        logs = wmpo.grpo_update(pol, torch.optim.SGD(pol.parameters(), lr=1e-3), batch,
                                wmpo.GRPOConfig(minibatches=1, epochs=1, temperature=1.0))
        assert (pol.logprob(f, w, tokens).item() - before) * adv > 0 and logs["grpo/tokens"] == 16


@pytest.mark.parametrize("sampling", ["independent", "shared"])
def test_masked_actions_inside_a_chunk_get_no_gradient(sampling):
    # success on frame 3 of a chunk: actions 3..7 never ran, so their tokens must not move the policy (shared
    # sampling: nor narrow the interval its executed tokens' draw lies in)
    pol = tiny_policy(sampling=sampling)
    f, w = frames(2), wmpo.tokenize(["go to the red pad"] * 2, wmpo.VOCAB)
    _, tokens, _ = pol.act(f, w, 1.0)
    tmask = wmpo.action_mask(torch.tensor([3, 3]), n_chunks=1, K=8, A=2)[:, 0]  # (2, 16)
    cfg = wmpo.GRPOConfig(lr=1e-2, minibatches=1, epochs=1)
    grads = []
    for flip in [False, True]:  # change only the masked tokens: the update must not change
        t = tokens.clone()
        if flip:
            t[~tmask] = (t[~tmask] + 17) % 256
        p = tiny_policy(sampling=sampling)
        p.load_state_dict(pol.state_dict())
        wmpo.grpo_update(p, torch.optim.SGD(p.parameters(), lr=cfg.lr), {"obs": f, "words": w, "tokens": t,
                         "adv": torch.tensor([1.0, -1.0]), "mask": torch.ones(2, dtype=torch.bool), "token_mask": tmask}, cfg)
        grads.append(torch.cat([q.detach().flatten() for q in p.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-7, rtol=0)


def test_action_mask_and_dynamic_sampling_drop_uniform_groups():
    from kernels.grpo import group_advantages

    m = wmpo.action_mask(torch.tensor([0, 9, 16, 30]), n_chunks=4, K=8, A=2)  # (4, 4, 16)
    counted = m.reshape(4, 4, 8, 2)[..., 0].reshape(4, 32)  # per action, in execution order
    for i, finish in enumerate([0, 9, 16, 30]):  # action j counts iff j < finish (it made frame j + 1)
        assert counted[i].tolist() == [j < finish for j in range(32)]
    assert (m.reshape(4, 4, 8, 2)[..., 0] == m.reshape(4, 4, 8, 2)[..., 1]).all()  # both dims of an action
    # executing E = 2 of each chunk's 8 actions: chunk n runs global actions 2n, 2n + 1; the other 6 never ran
    m2 = wmpo.action_mask(torch.tensor([5]), n_chunks=4, K=8, A=2, E=2).reshape(4, 8, 2)[..., 0]
    assert m2.tolist() == [[j < 2 and 2 * n + j < 5 for j in range(8)] for n in range(4)]
    success = torch.tensor([1, 1, 1, 1, 0, 1, 0, 0], dtype=torch.float32)  # group 0 uniform, group 1 mixed
    adv, st = group_advantages(success, 4, return_stats=True)
    keep = st["keep"].repeat_interleave(4)
    tr = {"obs": torch.zeros(8, 2, 64, 64, 3, dtype=torch.uint8), "tokens": torch.zeros(8, 2, 16, dtype=torch.long),
          "words": torch.zeros(8, 24, dtype=torch.long), "token_mask": torch.ones(8, 2, 16, dtype=torch.bool)}
    rows = wmpo.flatten_rows(tr, adv, keep)
    assert rows["mask"].tolist() == [False] * 8 + [True] * 8
    assert rows["adv"][8:].abs().sum() > 0 and rows["adv"][:8].abs().sum() == 0
