# bash completion for contree: eval "$(contree completion bash)"
# A thin wrapper: the candidates come from `contree __complete` (the shell's engine).
_contree() {
    local cur="${COMP_WORDS[COMP_CWORD]}" line
    if [[ -n "${COMP_LINE-}" ]]; then
        line="${COMP_LINE:0:${COMP_POINT:-${#COMP_LINE}}}"
    else
        line="${COMP_WORDS[*]:0:$((COMP_CWORD + 1))}"
    fi
    local IFS=$'\n'
    COMPREPLY=($(command "${COMP_WORDS[0]:-contree}" __complete --shell bash \
        --cur "$cur" -- "$line" 2>/dev/null))
    if [[ ${#COMPREPLY[@]} -eq 1 && "${COMPREPLY[0]}" == */ ]]; then
        compopt -o nospace 2>/dev/null
    fi
    return 0
}
complete -o default -F _contree contree
