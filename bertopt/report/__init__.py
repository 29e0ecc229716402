"""Reports: the structural graph diff (diff), its pictures (render) and the self-contained HTML page (html)."""
