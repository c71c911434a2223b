"""`vglaw bench`'s library: the measurements (`run`), their report (`report`) and the timer (`timing`)."""
