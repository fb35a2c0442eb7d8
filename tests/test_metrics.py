"""Metrics: reference-only PPL, BLEU and NIST against hand computations, the pycocoevalcap metrics."""
import math

import pytest
import torch

from hsplit_nb.metrics import bleu, e2e_metrics, generate, mteval_tokenize, nist, perplexity, ptb_tokenize, token_nll
from hsplit_nb.models import tiny_model

HYPS = ["The cat sat on the mat.", "A dog is here."]
REFS = [["The cat is on the mat.", "There is a cat on the mat."], ["There is a dog here.", "A dog is here."]]


def test_mteval_tokenisation():
    assert mteval_tokenize("The cat sat on the mat.") == ["the", "cat", "sat", "on", "the", "mat", "."]
    assert mteval_tokenize("It costs £20-25, 3.5 stars") == ["it", "costs", "£20", "-", "25", ",", "3.5", "stars"]


def test_bleu_by_hand():
    # clipped matches / output n-grams over both outputs: 11/12, 8/10, 5/8, 3/6; lengths 12 vs 12 (BP 1)
    expected = ((11 / 12) * (8 / 10) * (5 / 8) * (3 / 6)) ** 0.25
    assert bleu(HYPS, REFS) == pytest.approx(expected, rel=1e-12)
    # a short output is penalised: exp(1 - r/c) with r, c the closest reference and output lengths
    short = bleu(["the cat"], [["the cat is here"]], max_n=2)
    assert short == pytest.approx(math.exp(1 - 4 / 2) * 1.0, rel=1e-12)
    assert bleu(["a b c d"], [["e f g h"]]) < 1e-3


def test_nist_by_hand():
    # reference corpus: 26 words; unigram counts the 3, a 3, is 4, . 4, cat/on/mat/dog/here/there 2
    l2 = math.log2
    unigram = (3 * l2(26 / 3) + 5 * l2(26 / 2) + 3 * l2(26 / 4)) / 12
    # matched bigrams: the cat (3/1), on the (2/2), the mat (3/2), mat . (2/2), a dog (3/2), dog is (2/1),
    # is here (4/1), here . (2/2), over 10 output bigrams
    bigram = (l2(3) + 0 + l2(1.5) + 0 + l2(1.5) + l2(2) + l2(4) + 0) / 10
    beta = -math.log(0.5) / math.log(1.5) ** 2
    penalty = math.exp(-beta * math.log(12 / 13) ** 2)  # 12 output words, mean reference lengths 7.5 + 5.5
    assert nist(HYPS, REFS, max_n=2) == pytest.approx(penalty * (unigram + bigram), rel=1e-12)
    assert nist(HYPS, REFS) > nist(HYPS, REFS, max_n=2)


def test_metric_errors():
    with pytest.raises(ValueError, match="got 2 outputs but 1 reference groups"):
        bleu(HYPS, REFS[:1])
    with pytest.raises(ValueError, match="output 0 has no references"):
        nist(["x"], [[]])


def test_e2e_metrics_perfect_and_poor_outputs():
    perfect = e2e_metrics([r[1] for r in REFS], REFS)
    poor = e2e_metrics(["zebra quantum", "purple"], REFS)
    assert set(perfect) == {"BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"}
    assert perfect["BLEU"] == pytest.approx(1.0) and perfect["ROUGE_L"] == pytest.approx(1.0)
    for k in perfect:
        assert perfect[k] > poor[k], k


# Four outputs with punctuation, a currency sign and 2-3 references each. The expected figures are what the
# official e2e-metrics script (tuetschek/e2e-metrics, `measure_scores.py -p`) prints for the same files.
OFFICIAL_HYPS = ["The Eagle is a cheap coffee shop near Burger King.",
                 "Zizzi is a pub with a rating of 5 out of 5, it's not family-friendly.",
                 "Near the river, The Mill serves French food for \u00a320-25.",
                 "Cotto is a coffee shop."]
OFFICIAL_REFS = [["The Eagle, a cheap coffee shop, is near Burger King.",
                  "Near Burger King is The Eagle, a coffee shop with low prices."],
                 ["Zizzi is a highly rated pub; it is not family friendly.",
                  "Zizzi, a pub rated 5 out of 5, is not for families.", "A pub named Zizzi has a 5 star rating."],
                 ["The Mill, by the river, serves French food at \u00a320-25.",
                  "French food at The Mill costs \u00a320-25 and it is near the river."],
                 ["Cotto is a coffee shop.", "There is a coffee shop called Cotto."]]
OFFICIAL_SCORES = {"BLEU": 0.4718, "NIST": 5.3581, "METEOR": 0.4587, "ROUGE_L": 0.7807, "CIDEr": 3.9300}


def test_e2e_metrics_equal_the_official_script():
    ours = e2e_metrics(OFFICIAL_HYPS, OFFICIAL_REFS)
    assert {k: round(v, 4) for k, v in ours.items()} == OFFICIAL_SCORES
    # METEOR, ROUGE-L and CIDEr see PTB tokens: lowercased, punctuation dropped, the pound sign as PTB writes it
    assert ptb_tokenize([[OFFICIAL_HYPS[1], OFFICIAL_REFS[2][0]]]) == [[
        "zizzi is a pub with a rating of 5 out of 5 it 's not family-friendly",
        "the mill by the river serves french food at # 20-25"]]


def test_perplexity_counts_reference_tokens_only(batch, tiny):
    model, _ = tiny
    with torch.no_grad():
        logits = model(**batch).logits
    nll, n = token_nll(logits, batch["labels"])
    assert n == int((batch["labels"][:, 1:] != -100).sum())
    assert perplexity(model, [batch]) == pytest.approx(math.exp(nll / n), rel=1e-6)
    assert perplexity(model, [batch]) == pytest.approx(math.exp(model(**batch).loss.item()), rel=1e-5)
    masked = {**batch, "labels": torch.full_like(batch["labels"], -100)}
    with pytest.raises(ValueError, match="no reference tokens"):
        perplexity(model, [masked])


def test_generate_returns_one_output_per_mr():
    model, tok = tiny_model("llama")
    outs = generate(model, tok, ["name[A], area[riverside]", "name[B]", "name[C], food[French]"], max_new_tokens=5,
                    num_beams=2, batch_size=2)
    assert len(outs) == 3 and all(isinstance(o, str) for o in outs)
    assert tok.padding_side == "right"


def test_generation_batch_size_does_not_change_the_outputs():
    """Left padding with its attention mask: batching MRs of different lengths gives each MR the output it gets
    alone (the comparison generates 20 MRs at a time for speed: eval_batch_size)."""
    model, tok = tiny_model("llama")
    mrs = ["name[A], area[riverside]", "name[B]", "name[C], food[French], priceRange[high]"]
    alone = [generate(model, tok, [mr], max_new_tokens=6, num_beams=2, batch_size=1)[0] for mr in mrs]
    assert generate(model, tok, mrs, max_new_tokens=6, num_beams=2, batch_size=3) == alone


def test_a_beam_ends_at_its_first_line_end_and_greedy_outputs_do_not_change():
    """generate keeps the first line of what the model writes, so stopping at a newline token must give the same
    greedy output as generating on and cutting; the stop list holds EOS and every token with a newline."""
    from hsplit_nb.data import SEPARATOR
    from hsplit_nb.metrics import line_end_ids

    model, tok = tiny_model("llama", seed=3)
    ids = line_end_ids(tok)
    assert tok.eos_token_id in ids and tok("\n", add_special_tokens=False)["input_ids"][0] in ids
    assert all("\n" in tok.decode([i]) for i in ids if i != tok.eos_token_id)
    mrs = ["name[A], area[riverside]", "name[B]"]
    cut = []
    for mr in mrs:
        enc = tok([mr + SEPARATOR], return_tensors="pt", add_special_tokens=False)
        out = model.generate(**enc, max_new_tokens=40, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
        cut.append(tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip().split("\n")[0].strip())
    assert generate(model, tok, mrs, max_new_tokens=40, num_beams=1, batch_size=1) == cut
