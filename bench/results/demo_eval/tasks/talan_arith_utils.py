from training.arithmetic import extract_answer


def process_results(doc, results):
    return {"acc": int(extract_answer(results[0]) == doc["answer"])}


def user_turn(doc):
    return next(m["content"] for m in doc["messages"] if m["role"] == "user")
