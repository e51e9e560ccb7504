# fish completion for contree: contree completion fish | source
# (or save as ~/.config/fish/completions/contree.fish). Candidates come from
# `contree __complete`.
function __contree_complete
    set -l line (commandline -cp)
    set -l cur (commandline -ct)
    command contree __complete --shell fish --cur "$cur" -- "$line" 2>/dev/null
end
complete -c contree -f -a '(__contree_complete)'
