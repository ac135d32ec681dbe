"""`captioner write-metadata`: captions of images captioned earlier written as XMP where photo
software reads them (core/metadata.py; docs/metadata.md)."""
from typing import Any, Callable

import click

from . import context


def metadata_options(command: Callable) -> Callable:
    """The options `caption --write-metadata` and `write-metadata` share."""
    command = click.option("--overwrite", is_flag=True,
                           help="Replace a description or alt text a person wrote (each one is logged).")(command)
    return click.option("--sidecar-name", type=click.Choice(["ext", "stem"]), default="ext", show_default=True,
                        help="ext: NAME.EXT.xmp (digiKam, Immich, darktable); stem: NAME.xmp (Lightroom).")(command)


def echo_report(report: Any) -> None:
    click.echo("metadata: " + ", ".join(f"{n} {outcome}" for outcome, n in sorted(report.counts.items())))
    for path, outcome, detail in report.notes:
        click.echo(f"  {outcome}: {path}: {detail}")


@click.command("write-metadata")
@click.argument("paths", nargs=-1, required=True)
@click.option("--mode", type=click.Choice(["sidecar", "embed"]), default="sidecar", show_default=True)
@click.option("--tenant", default="default", show_default=True)
@click.option("--model-version", default=None, help="Captions of this model version (default: each image's newest).")
@click.option("--limit", type=int, default=None, help="At most this many files.")
@metadata_options
def write_metadata(paths, mode, tenant, model_version, limit, sidecar_name, overwrite) -> None:
    """Write the caption, alt text and keywords of files captioned earlier (here or by the workers)
    as XMP: sidecars beside them, or embedded. A file is found by its content; one that changed
    since it was captioned is skipped and reported. An s3://bucket/prefix gets KEY.xmp objects
    beside its captioned images. Needs exiftool."""
    from captioner.core import metadata, storage

    s3 = [p for p in paths if p.startswith("s3://")]
    if s3 and (mode != "sidecar" or len(paths) > 1):
        raise click.UsageError("an s3:// prefix gets sidecars only, one at a time: --mode sidecar s3://bucket/prefix")
    settings = context.settings()
    with context.reported(), metadata.exiftool_processes() as tools:
        sm = context.database(settings)
        if s3:
            bucket, prefix = storage.split_s3(s3[0])
            report = metadata.write_s3_prefix(sm, tools[0], bucket, prefix, limit or settings.s3_prefix_limit, tenant,
                                              model_version)
        else:
            metadata.import_descriptions(sm, tools[0], paths, tenant, sidecar_name, limit)
            report = metadata.write_files(sm, tools, paths, mode, sidecar_name, tenant, model_version, overwrite,
                                          limit=limit)
    echo_report(report)
    if report.counts["error"]:
        raise SystemExit(1)


COMMANDS = [write_metadata]
