"""The DSPy tutorial's FastAPI app, as the tutorial writes it (the peer to beat).

Its LM is `DSPY_LM` at `DSPY_LM_API_BASE` (the benchmark's stub), so every
server in the benchmark calls the same LM.
"""

import os

import dspy
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

app = FastAPI(title="DSPy Program API", version="1.0.0")


class Question(BaseModel):
    text: str


lm = dspy.LM(os.environ["DSPY_LM"], api_base=os.environ["DSPY_LM_API_BASE"], cache=False)
dspy.configure(lm=lm, async_max_workers=4)  # the tutorial's setting (default 8)
dspy_program = dspy.asyncify(dspy.ChainOfThought("question -> answer"))


@app.post("/predict")
async def predict(question: Question):
    try:
        result = await dspy_program(question=question.text)
        return {"status": "success", "data": result.toDict()}
    except Exception as e:
        raise HTTPException(status_code=500, detail=str(e)) from e
