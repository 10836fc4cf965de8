"""The intruder's ServerApp: marks that it ran, then asks every node for its records."""

from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    markers = Path(str(context.run_config["marker-dir"]))
    (markers / "serverapp-ran").write_text("")
    query = RecordDict({"config": ConfigRecord({"want": "records"})})
    messages = [Message(query, dst_node_id=node, message_type=MessageType.QUERY) for node in grid.get_node_ids()]
    for reply in grid.send_and_receive(messages, timeout=60):
        if not reply.has_error():
            (markers / f"records-from-{reply.metadata.src_node_id}").write_text(str(reply.content.config_records["records"]["head"]))
