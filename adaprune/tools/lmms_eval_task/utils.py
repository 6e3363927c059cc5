"""lmms-eval hooks of adaprune's synthetic visual-question task: the scene, the question as asked (the task's
vocabulary is closed, so no instruction is added), and exact match as `adaprune eval` scores it."""

from adaprune.tools.evaluation import normalized


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    return {"exact_match": float(normalized(results[0] if results else "") == doc["answer"])}
