"""Where databases live: the local data root (one directory per database), the initdb
template new databases are cloned from, and the role metadata kept beside each PGDATA."""
