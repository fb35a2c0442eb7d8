"""Evaluation metrics. Perplexity counts reference tokens only (labels != -100)."""
from __future__ import annotations

import math
import re
from collections import Counter

import torch
import torch.nn.functional as F

from .data import IGNORE


@torch.no_grad()
def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """Summed next-token negative log-likelihood over labelled positions, and their count."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE,
                          reduction="sum")
    return nll.item(), int((labels != IGNORE).sum())


@torch.no_grad()
def perplexity(model, batches, device="cpu") -> float:
    """exp(mean NLL per reference token) of a causal LM (or any callable giving .logits) over batches."""
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    total, count = 0.0, 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        nll, n = token_nll(logits, batch["labels"])
        total, count = total + nll, count + n
    if was_training:
        model.train()
    if count == 0:
        raise ValueError("no reference tokens to score: every label is masked")
    return math.exp(total / count)


# ---- E2E generation metrics ---------------------------------------------------------------------
# BLEU and NIST follow the definitions of NIST's mteval-v13a (as the E2E challenge's own evaluation
# uses them): its basic tokenisation, lowercased, several references per output. METEOR, ROUGE-L and
# CIDEr come from pycocoevalcap (METEOR runs on Java).

def mteval_tokenize(text: str) -> list[str]:
    """mteval-v13a's language-independent normalisation and Western tokenisation, lowercased."""
    text = text.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    text = text.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    text = f" {text.lower()} "
    text = re.sub(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])", r" \1 ", text)
    text = re.sub(r"([^0-9])([\.,])", r"\1 \2 ", text)
    text = re.sub(r"([\.,])([^0-9])", r" \1 \2", text)
    text = re.sub(r"([0-9])(-)", r"\1 \2 ", text)
    return text.split()


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _max_ref_counts(refs: list[list[str]], n: int) -> Counter:
    out: Counter = Counter()
    for ref in refs:
        out |= _ngrams(ref, n)  # element-wise max over references
    return out


def bleu(hypotheses: list[str], references: list[list[str]], max_n: int = 4) -> float:
    """Corpus BLEU: clipped n-gram precisions (clipped by the most generous reference), geometric mean,
    brevity penalty against the reference closest in length to each output (ties: the shorter)."""
    _check_pairs(hypotheses, references)
    hits, totals, hyp_len, ref_len = [0] * max_n, [0] * max_n, 0, 0
    for hyp, refs in zip(hypotheses, references):
        h, rs = mteval_tokenize(hyp), [mteval_tokenize(r) for r in refs]
        for n in range(1, max_n + 1):
            counts = _ngrams(h, n)
            clip = _max_ref_counts(rs, n)
            hits[n - 1] += sum(min(c, clip[g]) for g, c in counts.items())
            totals[n - 1] += max(len(h) - n + 1, 0)
        hyp_len += len(h)
        ref_len += min((len(r) for r in rs), key=lambda length: (abs(length - len(h)), length))
    # a vanishing floor keeps BLEU defined (0) when some order has no match
    log_prec = sum(math.log(max(hit, 1e-15) / max(tot, 1e-9)) for hit, tot in zip(hits, totals)) / max_n
    bp = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / max(hyp_len, 1e-5))
    return bp * math.exp(log_prec)


NIST_BETA = -math.log(0.5) / math.log(1.5) ** 2  # length penalty 0.5 at 2/3 of the reference length


def nist(hypotheses: list[str], references: list[list[str]], max_n: int = 5) -> float:
    """Corpus NIST: matched n-grams weighted by information gain log2(count(w_1..w_{n-1}) / count(w_1..w_n))
    over all reference n-grams of the corpus, summed per order over the output n-grams, times the
    length penalty exp(-beta log^2(min(1, L_sys / L_ref))) with L_ref the mean reference length per output."""
    _check_pairs(hypotheses, references)
    hyps = [mteval_tokenize(h) for h in hypotheses]
    refs = [[mteval_tokenize(r) for r in rs] for rs in references]
    ref_counts = [Counter() for _ in range(max_n + 1)]
    for rs in refs:
        for r in rs:
            ref_counts[0][()] += len(r)
            for n in range(1, max_n + 1):
                ref_counts[n].update(_ngrams(r, n))

    def info(gram) -> float:
        return math.log2(ref_counts[len(gram) - 1][gram[:-1]] / ref_counts[len(gram)][gram])

    score = 0.0
    for n in range(1, max_n + 1):
        gained, total = 0.0, 0
        for h, rs in zip(hyps, refs):
            clip = _max_ref_counts(rs, n)
            gained += sum(min(c, clip[g]) * info(g) for g, c in _ngrams(h, n).items() if clip[g])
            total += max(len(h) - n + 1, 0)
        score += gained / total if total else 0.0
    sys_len = sum(len(h) for h in hyps)
    ref_len = sum(sum(len(r) for r in rs) / len(rs) for rs in refs)
    ratio = sys_len / ref_len
    penalty = 1.0 if ratio >= 1 else 0.0 if ratio <= 0 else math.exp(-NIST_BETA * math.log(ratio) ** 2)
    return penalty * score


def _check_pairs(hypotheses, references):
    if len(hypotheses) != len(references):
        raise ValueError(f"got {len(hypotheses)} outputs but {len(references)} reference groups")
    if not hypotheses:
        raise ValueError("no outputs to score")
    for i, refs in enumerate(references):
        if not refs:
            raise ValueError(f"output {i} has no references")


def ptb_tokenize(groups: list[list[str]]) -> list[list[str]]:
    """Every string through the PTB tokenizer exactly as COCOEvalCap calls it (Stanford CoreNLP 3.4.1, lowercased,
    one line per string, punctuation tokens removed), grouped as given."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    out = PTBTokenizer().tokenize({i: [{"caption": t} for t in texts] for i, texts in enumerate(groups)})
    return [out[i] for i in range(len(groups))]


def coco_metrics(hypotheses: list[str], references: list[list[str]]) -> dict[str, float]:
    """METEOR (Java), ROUGE-L and CIDEr as the official E2E script computes them: COCOEvalCap's PTB tokenizer
    on both sides, then pycocoevalcap's scorers."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge

    _check_pairs(hypotheses, references)
    gts = dict(enumerate(ptb_tokenize(references)))
    res = dict(enumerate(ptb_tokenize([[h] for h in hypotheses])))
    m, _ = Meteor().compute_score(gts, res)  # the Java process ends with the object
    r, _ = Rouge().compute_score(gts, res)
    c, _ = Cider().compute_score(gts, res)
    return {"METEOR": float(m), "ROUGE_L": float(r), "CIDEr": float(c)}


def e2e_metrics(hypotheses: list[str], references: list[list[str]]) -> dict[str, float]:
    """BLEU, NIST, METEOR, ROUGE-L and CIDEr with the E2E conventions (one output per MR, grouped references)."""
    return {"BLEU": bleu(hypotheses, references), "NIST": nist(hypotheses, references),
            **coco_metrics(hypotheses, references)}


def line_end_ids(tokenizer) -> list[int]:
    """The end-of-sequence token and every token whose text holds a newline: an output is its first line, so a beam
    that starts a second one is finished (and scored) there instead of spending steps on text that is cut off."""
    cached = getattr(tokenizer, "_hsplit_line_end_ids", None)
    if cached is None:
        vocab = tokenizer.get_vocab()
        texts = tokenizer.batch_decode([[i] for i in vocab.values()])
        cached = sorted({tokenizer.eos_token_id} | {i for i, t in zip(vocab.values(), texts) if "\n" in t})
        tokenizer._hsplit_line_end_ids = cached
    return cached


@torch.no_grad()
def generate(model, tokenizer, mrs: list[str], max_new_tokens: int = 60, num_beams: int = 4, batch_size: int = 8,
             device="cpu", progress: bool = False) -> list[str]:
    """Beam-search outputs for MRs with transformers' generate (left-padded prompts, no sampling); each output is the
    first line of what is generated, and a beam ends at its first line end (`line_end_ids`)."""
    from tqdm.auto import tqdm

    from .data import SEPARATOR

    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outputs = []
    try:
        for i in tqdm(range(0, len(mrs), batch_size), desc="generating", disable=not progress):
            chunk = [mr + SEPARATOR for mr in mrs[i:i + batch_size]]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            beams = {"num_beams": num_beams, "early_stopping": True} if num_beams > 1 else {}
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, **beams,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=line_end_ids(tokenizer))
            texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            outputs += [t.strip().split("\n")[0].strip() for t in texts]
    finally:
        tokenizer.padding_side = side
    return outputs
