"""Looking at engines: timelines (predicted and measured), Chrome/Perfetto traces,
Graphviz DOT graphs and a self-contained HTML report. Used by `tilec inspect` and
`tilec run --profile`; nothing here changes an engine."""
