def exact(example, prediction, trace=None) -> bool:
    return getattr(prediction, "category", None) == example.category
