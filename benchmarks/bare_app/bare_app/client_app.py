"""ClientApp that does no work: train replies with the arrays it received, evaluate with a count."""

from __future__ import annotations

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Return the received arrays unchanged, weighted by one example."""
    return Message(content=RecordDict({"arrays": msg.content["arrays"],
                                       "metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Report one example and no score."""
    return Message(content=RecordDict({"metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)
