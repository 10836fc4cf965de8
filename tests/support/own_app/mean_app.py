"""A job's own Flower app, as a user would bring one: each site reports the sum and count
of its data file's first column, and the server writes their scaled mean to result.json.
Used by tests/test_own_app.py."""

import json
import time
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

server = ServerApp()
client = ClientApp()


@client.query()
def column_sum(message: Message, context: Context) -> Message:
    values = np.loadtxt(str(context.node_config["data-path"]), delimiter=",", skiprows=1, usecols=0, ndmin=1)
    metrics = MetricRecord({"sum": float(values.sum()), "rows": len(values)})
    return Message(RecordDict({"column": metrics}), reply_to=message)


@server.main()
def main(grid: Grid, context: Context) -> None:
    while len(list(grid.get_node_ids())) < 2:
        time.sleep(0.5)
    query = RecordDict({"config": ConfigRecord({"what": "column-sum"})})
    messages = [Message(query, dst_node_id=node, message_type=MessageType.QUERY) for node in grid.get_node_ids()]
    replies = list(grid.send_and_receive(messages, timeout=120))
    total = sum(float(r.content.metric_records["column"]["sum"]) for r in replies)
    rows = sum(int(r.content.metric_records["column"]["rows"]) for r in replies)
    result = {"mean": total / rows * float(context.run_config["scale"]), "sites": len(replies)}
    (Path(str(context.run_config["output-dir"])) / "result.json").write_text(json.dumps(result))
