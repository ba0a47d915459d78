
#compdef gcsstream

_gcsstream_completion() {
  eval $(env _TYPER_COMPLETE_ARGS="${words[1,$CURRENT]}" _GCSSTREAM_COMPLETE=complete_zsh gcsstream)
}

compdef _gcsstream_completion gcsstream

