"""Zero-shot evaluation (issue 13): the WikiText detokenizer rule by rule, the overlapping windows, the
adjusted perplexity against a hand computation, strict vs last-token LAMBADA on a model that memorised its
passages, and bad input as one-line errors."""

from __future__ import annotations

import json
import math
import random
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from mtlm.api import load_model
from mtlm.data import DataError
from mtlm.eval import detokenize as d
from mtlm.eval.loading import load_gpt, load_tokenizer, read_checkpoint
from mtlm.eval.metrics import lambada_example, perplexities, split_last_word, window_spans
from mtlm.eval.scoring import score_continuations, score_stream
from mtlm.eval.tasks import evaluate_lambada, evaluate_wikitext, prepare, read_lambada, read_text
from mtlm.model.gpt import GPT
from mtlm.parallel.state import ParallelState
from tests.eval_helpers import make_checkpoint, tiny_config


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("eval"))


# ---- detokenizer, one rule at a time ---------------------------------------------------------------------

@pytest.mark.parametrize("rule, raw, expected", [
    (d.join_number_separators, "sold 1 @,@ 000 copies", "sold 1,000 copies"),
    (d.join_number_separators, "rated 3 @.@ 5 stars", "rated 3.5 stars"),
    (d.join_number_separators, "a role @-@ playing game", "a role-playing game"),
    (d.fix_possessives, "the game 's story", "the game's story"),
    (d.fix_possessives, "the players ' units", "the players' units"),
    (d.tighten_punctuation, "Japan , it is . Yes ; no : maybe ? Go !", "Japan, it is. Yes; no: maybe? Go!"),
    (d.tighten_punctuation, "the end .", "the end."),
    (d.tighten_punctuation, "e.g. Media.Vision stays", "e.g. Media.Vision stays"),
    (d.tighten_brackets_and_quotes, "Senjō ( Japanese : x ) and [ 1 ] { a }", "Senjō (Japanese : x) and [1] {a}"),
    (d.tighten_brackets_and_quotes, 'previous " Valkyria Chronicles " games', 'previous "Valkyria Chronicles" games'),
    (d.join_heading_markers, " = = = Reception = = = ", " === Reception === "),
    (d.join_heading_markers, " = Valkyria = ", " = Valkyria = "),
    (d.trim_line_edges, " a \n b \n", " a\nb\n"),
])
def test_detokenizer_rules(rule, raw, expected):
    assert rule(raw) == expected


def test_detokenize_whole_paragraph():
    raw = (' = = Gameplay = = \n Released in 2011 , it sold 1 @,@ 000 copies ( in Japan ) , rated 3 @.@ 5 . '
           'The players \' units \'s " Squad 7 " . \n')
    assert d.wikitext_detokenize(raw) == (' == Gameplay ==\nReleased in 2011, it sold 1,000 copies (in Japan), '
                                          'rated 3.5. The players\' units\'s "Squad 7".\n')


def test_original_token_count_splits_on_single_spaces():
    # stripped, then split on " ": '=', 'Title', '=', '\n', 'a', 'b', '' (two spaces), 'c'
    assert d.original_token_count(" = Title = \n a b  c \n") == 8
    assert d.original_token_count("one two three") == 3


# ---- windows ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_tokens, seq, stride", [(2, 4, 1), (5, 4, 4), (6, 4, 4), (50, 8, 3), (51, 8, 8),
                                                     (100, 16, 5), (17, 16, 16), (1000, 32, 32), (999, 32, 7)])
def test_windows_score_every_target_exactly_once(num_tokens, seq, stride):
    spans = window_spans(num_tokens, seq, stride)
    scored = [j for w in spans for j in range(w.first_scored, w.end)]
    assert scored == list(range(1, num_tokens))  # each target once, in order
    for i, w in enumerate(spans):
        assert w.end - w.start == min(seq + 1, num_tokens)  # full windows: they batch
        assert w.start <= w.first_scored - 1  # a scored target's context is inside the window
        if i:
            assert w.end - w.first_scored <= stride  # later windows score only their new targets
            assert w.first_scored - w.start >= seq + 1 - stride  # ...with at least seq + 1 - stride of context


def test_perplexity_formulas():
    p = perplexities(loss_sum=30.0, num_targets=10, num_original_tokens=7)
    assert p["ppl"] == pytest.approx(math.exp(3.0))
    assert p["adjusted_ppl"] == pytest.approx(math.exp(30.0 / 6))
    assert perplexities(1e6, 10, 7)["ppl"] == pytest.approx(math.exp(20))  # clamped as the protocol


def test_score_stream_equals_a_naive_loop_over_the_windows(ckpt):
    step_dir, meta = read_checkpoint(ckpt)
    model = load_gpt(step_dir, meta, ParallelState())
    full = load_model(ckpt)
    ids = random.Random(0).choices(range(meta["model"]["vocab_size"]), k=75)
    total, n = score_stream(model, ids, seq_length=16, stride=5, batch_size=3)
    naive = 0.0
    with torch.no_grad():
        for w in window_spans(len(ids), 16, 5):
            logp = F.log_softmax(full(torch.tensor([ids[w.start:w.end - 1]]))[0].double(), -1)
            naive -= sum(logp[j - w.start - 1, ids[j]].item() for j in range(w.first_scored, w.end))
    assert n == len(ids) - 1
    assert total == pytest.approx(naive, rel=1e-6)


def test_adjusted_perplexity_equals_hand_computation(ckpt, tmp_path):
    raw = " = Valkyria = \n The game 's story , set in 1 @,@ 935 , follows a squad . \n"
    path = tmp_path / "wiki.test.raw"
    path.write_text(raw, encoding="utf-8")
    step_dir, meta = read_checkpoint(ckpt)
    tok = load_tokenizer(meta, None, step_dir)
    job = prepare("wikitext", str(path), "text", tok.encode)
    # Counted by hand: '=', 'Valkyria', '=', '\n', 'The', 'game', "'s", 'story', ',', 'set', 'in', '1', '@,@',
    # '935', ',', 'follows', 'a', 'squad', '.' (the raw text stripped, split on single spaces).
    assert job["num_original_tokens"] == 19
    ids = tok.encode(" = Valkyria =\nThe game's story, set in 1,935, follows a squad.\n")
    assert job["ids"] == ids
    with torch.no_grad():  # one window holds it all: per-token losses from the plain model's logits
        logp = F.log_softmax(load_model(ckpt)(torch.tensor([ids[:-1]]))[0].double(), -1)
    losses = [-logp[j - 1, ids[j]].item() for j in range(1, len(ids))]
    result = evaluate_wikitext(load_gpt(step_dir, meta, ParallelState()), job["ids"], 19, seq_length=63,
                               stride=8, batch_size=4)
    assert len(ids) - 1 <= 63 and result["num_tokens"] == len(losses)
    assert result["ppl"] == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-6)
    assert result["adjusted_ppl"] == pytest.approx(math.exp(sum(losses) / (19 - 1)), rel=1e-6)


# ---- LAMBADA ---------------------------------------------------------------------------------------------

class WordTokenizer:
    """Whole words, except the few the test splits into pieces (multi-token last words)."""

    PIECES = {"sunset": ["sun", "set"], "moonset": ["moon", "set"], "sunrise": ["sun", "rise"]}

    def __init__(self, words):
        pieces = sorted({p for w in words for p in self.PIECES.get(w, [w])})
        self.vocab = {p: i for i, p in enumerate(pieces)}

    def encode(self, text):
        return [self.vocab[p] for w in text.split() for p in self.PIECES.get(w, [w])]


PASSAGES = ["we sat on the hill and watched the sunset",
            "she looked up at the night sky to see the moonset",
            "the old dog slept by the warm fire all night",
            "after the long winter the river ran fast and cold"]


@pytest.fixture(scope="module")
def memorised():
    """A tiny GPT trained (a few seconds) until it reproduces PASSAGES token for token."""
    test_only = ["we sat on the hill and watched the moonset", "we sat on the hill and watched the sunrise"]
    tok = WordTokenizer(" ".join(PASSAGES + test_only).split())
    torch.manual_seed(0)
    model = GPT(tiny_config(seq_length=16, max_position_embeddings=16, init_std=0.02), len(tok.vocab),
                ParallelState())
    model.init_weights(0)
    rows = [tok.encode(p) for p in PASSAGES]
    width = max(map(len, rows))
    batch = torch.tensor([r + [r[-1]] * (width - len(r)) for r in rows])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        loss = model(batch[:, :-1], batch[:, 1:]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), tok


def test_lambada_strict_and_last_token(memorised):
    model, tok = memorised
    examples = list(PASSAGES)
    strict = [lambada_example(tok.encode, p, strict=True) for p in examples]
    last = [lambada_example(tok.encode, p, strict=False) for p in examples]
    assert [len(label) for _, label in strict] == [2, 2, 1, 1]  # sun|set, moon|set: multi-token last words
    r = evaluate_lambada(model, strict, last, seq_length=16, batch_size=3)
    assert (r["accuracy_strict"], r["accuracy"], r["num_examples"]) == (1.0, 1.0, 4)
    assert 1.0 <= r["last_word_ppl"] < 1.5  # memorised: the last word is near-certain

    # "...watched the moonset": after this context the model says "sun", so the whole word fails (strict), but
    # teacher-forced "moon" is always followed by "set", which the last-token check alone sees.
    # "...watched the sunrise": the first piece is right, the last is not: wrong in both.
    changed = ["we sat on the hill and watched the moonset", "we sat on the hill and watched the sunrise"]
    strict = [lambada_example(tok.encode, p, strict=True) for p in changed]
    last = [lambada_example(tok.encode, p, strict=False) for p in changed]
    scores = score_continuations(model, strict, 16)
    assert [s.greedy for s in scores] == [False, False]
    assert [s.greedy for s in score_continuations(model, last, 16)] == [True, False]
    r = evaluate_lambada(model, strict, last, seq_length=16, batch_size=2)
    assert (r["accuracy_strict"], r["accuracy"]) == (0.0, 0.5)


def test_split_last_word():
    assert split_last_word(" a b  c ") == ("a b ", "c")
    with pytest.raises(ValueError):
        split_last_word("single")


# ---- bad input: one line each ----------------------------------------------------------------------------

def test_bad_input_is_one_line(ckpt, tmp_path):
    with pytest.raises(DataError, match=r"^data.path: file not found: .*nope$"):
        read_text(str(tmp_path / "nope"))
    (tmp_path / "latin1.raw").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match=r"not UTF-8 text \(byte 3\)"):
        read_text(str(tmp_path / "latin1.raw"))
    (tmp_path / "l.jsonl").write_text(json.dumps({"text": "a b"}) + "\n" + json.dumps({"txt": "c d"}) + "\n")
    with pytest.raises(DataError, match=r"line 2 has no 'text' text field"):
        read_lambada(str(tmp_path / "l.jsonl"))
    step_dir, meta = read_checkpoint(ckpt)
    other = make_checkpoint(tmp_path / "other", vocab_size=400)  # another tokenizer: 400 pieces, not 340
    with pytest.raises(DataError, match=r"has 400 tokens but .* was trained with a 340-token tokenizer"):
        load_tokenizer(meta, _tokenizer(model=str(other.parent / "tok.model")), step_dir)
    with pytest.raises(DataError, match=r"records no tokenizer \(a converted model\?\); give the one"):
        load_tokenizer({**meta, "tokenizer": None}, _tokenizer(), step_dir)


def _tokenizer(**keys):
    """A data.tokenizer node (all null: the checkpoint's own)."""
    return SimpleNamespace(**{"type": None, "model": None, "vocab_file": None, "merge_file": None, **keys})


def test_converted_huggingface_gpt2_with_gpt2_bpe(tmp_path):
    """A transformers GPT-2 through mtlm.convert from-hf, evaluated with a GPT-2 BPE tokenizer: the summed
    loss equals transformers' own loss on the same tokens."""
    transformers = pytest.importorskip("transformers")
    from mtlm.convert import from_hf
    from mtlm.data.gpt2_bpe import EOD, bytes_to_symbols, write_bpe_files

    vocab = {sym: i for i, sym in enumerate(bytes_to_symbols().values())}
    vocab[EOD] = len(vocab)
    vocab_file, merge_file = write_bpe_files(tmp_path / "bpe", vocab, [])  # bytes only: no merges
    config = transformers.GPT2Config(vocab_size=len(vocab), n_positions=64, n_embd=32, n_layer=2, n_head=4)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(config).eval()
    hf.save_pretrained(tmp_path / "hf")
    step_dir, meta = read_checkpoint(from_hf(tmp_path / "hf", tmp_path / "ckpt"))
    with pytest.raises(DataError, match="records no tokenizer"):
        load_tokenizer(meta, _tokenizer(), step_dir)
    tok = load_tokenizer(meta, _tokenizer(type="gpt2", vocab_file=str(vocab_file), merge_file=str(merge_file)),
                         step_dir)
    ids = tok.encode(" The game's story, set in 1935.")
    loss_sum, n = score_stream(load_gpt(step_dir, meta, ParallelState()), ids, 63, 32)
    with torch.no_grad():
        hf_loss = hf(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    assert n == len(ids) - 1 and loss_sum == pytest.approx(hf_loss * n, rel=1e-5)
