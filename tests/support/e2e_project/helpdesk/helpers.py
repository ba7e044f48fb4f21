"""A helper module the program imports: it must travel inside the artifact too."""


def clean_ticket(text: str) -> str:
    return " ".join(text.split())
