"""API keys and tenants' S3 allow-lists."""
import click

from . import context


@click.group()
def keys() -> None:
    """API keys: the API answers 401 without one (unless CAPTIONER_AUTH=off)."""


@keys.command("create")
@click.option("--tenant", required=True, help="Whose images the key reads and writes.")
@click.option("--scope", type=click.Choice(["read", "write", "admin"]), default="write", show_default=True,
              help="read: GET routes; write: also submit; admin: everything (each includes the ones before).")
@click.option("--name", default="", help="A note to tell keys apart in `keys list`.")
def keys_create(tenant, scope, name) -> None:
    """Create a key; it is printed once, as the last word of the last line, and only its hash is kept."""
    from captioner.core import auth

    with context.reported(), context.database(context.settings()).begin() as s:
        row, key = auth.create_key(s, tenant, scope, name)
        key_id, scopes = row.id, row.scopes
    click.echo(f"key {key_id} for tenant {tenant} (scopes: {scopes}); it is shown only now, store it:", err=True)
    click.echo(key)


@keys.command("revoke")
@click.argument("key_id", type=int)
def keys_revoke(key_id) -> None:
    """Revoke key KEY_ID: requests with it get 401 from now on."""
    from captioner.core import auth

    with context.reported(), context.database(context.settings()).begin() as s:
        row = auth.revoke_key(s, key_id)
        click.echo(f"key {row.id} ({row.tenant}, {row.prefix}) revoked at {row.revoked_at.isoformat()}")


@keys.command("list")
@click.option("--tenant", default=None)
def keys_list(tenant) -> None:
    """Keys with their tenant, public prefix, scopes and last use (never the keys themselves)."""
    from captioner.core import auth

    with context.database(context.settings())() as s:
        rows = auth.list_keys(s, tenant)
    for r in rows:
        state = f"revoked {r.revoked_at.isoformat()}" if r.revoked_at else "active"
        used = r.last_used_at.isoformat() if r.last_used_at else "never used"
        click.echo(f"{r.id:>5}  {r.tenant}  cap_{r.prefix}_...  {r.scopes}  {state}  {used}  {r.name}")


@click.group()
def tenants() -> None:
    """Tenants' S3 allow-lists: a tenant may submit images only from the locations allowed here."""


@tenants.command("allow-bucket")
@click.argument("tenant")
@click.argument("location")
def tenants_allow_bucket(tenant, location) -> None:
    """Let TENANT submit objects under LOCATION (s3://bucket or s3://bucket/prefix; the prefix is
    matched as a string, so end it with / to mean a folder)."""
    from captioner.core import auth

    bucket, prefix = _change_allowance(auth.allow_bucket, tenant, location)
    click.echo(f"tenant {tenant} may read s3://{bucket}/{prefix}")


@tenants.command("deny-bucket")
@click.argument("tenant")
@click.argument("location")
def tenants_deny_bucket(tenant, location) -> None:
    """Remove an allowance made with allow-bucket (images already submitted stay)."""
    from captioner.core import auth

    bucket, prefix = _change_allowance(auth.deny_bucket, tenant, location)
    click.echo(f"tenant {tenant} may no longer read s3://{bucket}/{prefix}")


def _change_allowance(change, tenant: str, location: str) -> tuple[str, str]:
    from captioner.core import storage

    with context.reported():
        bucket, prefix = storage.split_s3(location)
        with context.database(context.settings()).begin() as s:
            change(s, tenant, bucket, prefix)
    return bucket, prefix


@tenants.command("list")
def tenants_list() -> None:
    """Every tenant's allowed S3 locations."""
    from captioner.core import auth

    with context.database(context.settings())() as s:
        for row in auth.allowed_buckets(s):
            click.echo(f"{row.tenant}  s3://{row.bucket}/{row.prefix}")


COMMANDS = [keys, tenants]
