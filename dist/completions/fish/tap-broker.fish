complete -c tap-broker -l config -d 'Policy file (TOML). Without it: the embedded default, which serves root only, on /run/tapjail/broker.sock, images under /var/lib/tapjail' -r -F
complete -c tap-broker -l check -d 'Validate the configuration and exit'
complete -c tap-broker -l print-default-config -d 'Print the embedded default policy and exit'
complete -c tap-broker -l down -d 'Take every disk down (adopting what a previous tap-broker left, then destroying it all) and exit, instead of serving'
complete -c tap-broker -l fd-holder -d 'Internal: run as the fd holder tap-broker starts for itself'
complete -c tap-broker -l open-helper -d 'Internal: run as the image opener tap-broker starts for itself'
complete -c tap-broker -s h -l help -d 'Print help'
complete -c tap-broker -s V -l version -d 'Print version'
