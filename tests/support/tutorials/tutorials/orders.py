"""A Pydantic output from two inputs, `forward` only."""

import dspy
from pydantic import BaseModel


class Order(BaseModel):
    item: str
    quantity: int


class TakeOrder(dspy.Signature):
    """Read the customer's message and write down what they ordered."""

    customer: str = dspy.InputField()
    message: str = dspy.InputField()
    order: Order = dspy.OutputField()


class OrderTaker(dspy.Module):
    def __init__(self):
        super().__init__()
        self.take = dspy.Predict(TakeOrder)

    def forward(self, customer: str, message: str):
        return self.take(customer=customer, message=message)
