"""The intruder's ClientApp: marks that it ran at a site and sends the site's first records."""

from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.query()
def query(message: Message, context: Context) -> Message:
    markers = Path(str(context.run_config["marker-dir"]))
    (markers / f"clientapp-ran-at-{context.node_config.get('site', context.node_id)}").write_text("")
    head = Path(str(context.node_config["data-path"])).read_text()[:200]
    return Message(RecordDict({"records": ConfigRecord({"head": head})}), reply_to=message)
