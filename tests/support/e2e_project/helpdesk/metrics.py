def category_matches(example, prediction, trace=None) -> bool:
    return getattr(prediction, "category", None) == example.category
