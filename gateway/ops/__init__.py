"""Operations on databases that the CLI and the admin API share: create, delete, fork,
snapshot, restore, verify, passwords, uploads, upgrades, migrations and dumps."""
