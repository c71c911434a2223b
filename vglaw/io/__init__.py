"""File plumbing under every command: outputs written whole or not at all (`atomic`), pickles and
checkpoints read without running code (`safe_pickle`), the record of recent models (`recent`)."""
