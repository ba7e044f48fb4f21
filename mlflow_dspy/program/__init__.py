"""Layer 1: what a program is, and how a chat reaches it.

* `reference`: resolve `package.module:attr` or `file.py:attr` to a `dspy.Module`;
* `project`: a program named by reference, by a project file, or as an example;
* `mapping`: the chat mapping read from the program's signature;
* `chat`: `ChatProgram`, the `dspy.Module` that answers OpenAI chat messages;
* `datasets`, `metrics`: a program's data and how it is scored.

Nothing here imports from the layers above (engines, runtime, packaging, gateway).
"""
