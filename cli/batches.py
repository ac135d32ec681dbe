"""Batches: list them, show one (counts, failures by code, the failed images), cancel one."""
import json

import click

from . import context

STATUSES = ["queued", "processing", "done", "failed"]


@click.group()
def batches() -> None:
    """Batches of images: progress, failures and cancelling."""


@batches.command("list")
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True)
@click.option("--offset", type=click.IntRange(0), default=0, show_default=True, help="Skip this many (paging).")
@click.option("--tenant", default="default", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per batch.")
def batches_list(limit, offset, tenant, as_json) -> None:
    """The tenant's batches, newest first, with their counts per status."""
    from captioner.core import batches as core_batches

    with context.reported(), context.database(context.settings())() as s:
        rows = core_batches.listing(s, tenant, limit, offset)
    for b in rows:
        c = b["counts"]
        click.echo(json.dumps(b) if as_json else
                   f"{b['id']:>6}  {b['created_at'][:16]}  {b['total']:>7} images  {c['done']} done  "
                   f"{c['failed']} failed  {c['queued'] + c['processing']} waiting  {b['source']}")
    if not rows and not as_json:
        click.echo("no batches", err=True)


@batches.command("show")
@click.argument("batch_id", type=int)
@click.option("--status", type=click.Choice(STATUSES), default="failed", show_default=True,
              help="Which of its images to list.")
@click.option("--limit", type=click.IntRange(0), default=50, show_default=True, help="Images to list at most.")
@click.option("--tenant", default="default", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="The batch as one JSON object, its listed images included.")
def batches_show(batch_id, status, limit, tenant, as_json) -> None:
    """Batch BATCH_ID: counts per status, failures by error code, and its failed images (or
    those with --status) with their error."""
    from captioner.core import batches as core_batches
    from captioner.core import queries

    with context.reported(), context.database(context.settings())() as s:
        view = queries.batch_view(s, batch_id, tenant)
        images = core_batches.images(s, batch_id, tenant, status, limit) if limit else []
    if as_json:
        click.echo(json.dumps({**view, "images": images}))
        return
    c = view["counts"]
    click.echo(f"batch {view['id']}: {view['source']} (model {view['model_version']}, {view['created_at'][:16]})")
    click.echo(f"{view['total']} images: {c['done']} done, {c['failed']} failed, {c['processing']} processing, "
               f"{c['queued']} queued")
    for code, n in view["failures"].items():
        click.echo(f"  failed: {n} x {code}")
    for i in images:
        detail = f"{i['error']['code']}: {i['error']['message']}" if i["error"] else (i["caption"] or "")
        click.echo(f"{i['id']:>7}  {i['status']}  {i['source']}  {detail}")
    if len(images) == limit and limit:
        click.echo(f"(the first {limit} {status} images; --limit shows more)", err=True)


@batches.command("cancel")
@click.argument("batch_id", type=int)
@click.option("--tenant", default="default", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="The outcome as one JSON object.")
def batches_cancel(batch_id, tenant, as_json) -> None:
    """Cancel batch BATCH_ID: its queued images fail with code cancelled (workers skip them),
    those being captioned finish, done ones stay. Running it again changes nothing;
    `captioner retry --batch ID --error cancelled` queues them again."""
    from captioner.core import batches as core_batches

    with context.reported(), context.database(context.settings()).begin() as s:
        cancelled = core_batches.cancel(s, batch_id, tenant)
    click.echo(json.dumps({"id": batch_id, "cancelled": cancelled}) if as_json else
               f"batch {batch_id}: {cancelled} queued images cancelled")


COMMANDS = [batches]
