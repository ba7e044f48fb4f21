"""Metrics as DSPy's tutorials write them: `(example, prediction, trace=None)`."""


def answer_matches(example, prediction, trace=None) -> bool:
    return str(example.answer).strip().lower() in str(prediction.answer).strip().lower()


def number_close(example, prediction, trace=None) -> bool:
    try:
        return abs(float(prediction.answer) - float(example.answer)) < 1e-6
    except (TypeError, ValueError):
        return False


def entities_found(example, prediction, trace=None) -> float:
    expected = {e.lower() for e in example.entities}
    found = {str(e).lower() for e in (prediction.entities or [])}
    return len(expected & found) / len(expected) if expected else 0.0


def order_matches(example, prediction, trace=None) -> bool:
    return prediction.order is not None and prediction.order.item.lower() == example.order.item.lower()
