"""What every package of the project shares and that belongs to none of them (the user-facing error)."""
