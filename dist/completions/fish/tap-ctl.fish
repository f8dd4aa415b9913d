# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_tap_ctl_global_optspecs
    string join \n socket= timeout= h/help V/version
end

function __fish_tap_ctl_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_tap_ctl_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_tap_ctl_using_subcommand
    set -l cmd (__fish_tap_ctl_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c tap-ctl -n "__fish_tap_ctl_needs_command" -l socket -d 'tap-broker\'s control socket' -r -F
complete -c tap-ctl -n "__fish_tap_ctl_needs_command" -l timeout -d 'Seconds to wait for tap-broker\'s answer before giving up' -r
complete -c tap-ctl -n "__fish_tap_ctl_needs_command" -s h -l help -d 'Print help'
complete -c tap-ctl -n "__fish_tap_ctl_needs_command" -s V -l version -d 'Print version'
complete -c tap-ctl -n "__fish_tap_ctl_needs_command" -f -a "vhd" -d 'Offline VHD image tools (vhd-util\'s verbs)'
complete -c tap-ctl -n "__fish_tap_ctl_needs_command" -f -a "policy" -d 'Check a tap-broker policy file'
complete -c tap-ctl -n "__fish_tap_ctl_needs_command" -f -a "audit" -d 'Check a tap-broker audit log'
complete -c tap-ctl -n "__fish_tap_ctl_needs_command" -f -a "metrics" -d 'Print every visible disk\'s counters and latency histograms in Prometheus\' text format'
complete -c tap-ctl -n "__fish_tap_ctl_needs_command" -f -a "cbt" -d 'Changed-block tracking of a disk, for incremental backup'
complete -c tap-ctl -n "__fish_tap_ctl_needs_command" -f -a "allocate" -d 'Allocate a minor; prints its device path'
complete -c tap-ctl -n "__fish_tap_ctl_needs_command" -f -a "free" -d 'Release a minor (it must be detached)'
complete -c tap-ctl -n "__fish_tap_ctl_needs_command" -f -a "spawn" -d 'Start a tapdisk worker; prints its pid'
complete -c tap-ctl -n "__fish_tap_ctl_needs_command" -f -a "attach" -d 'Attach a tapdisk to a minor'
complete -c tap-ctl -n "__fish_tap_ctl_needs_command" -f -a "detach" -d 'Detach a minor\'s tapdisk; this ends that tapdisk'
complete -c tap-ctl -n "__fish_tap_ctl_needs_command" -f -a "open" -d 'Open an image on an attached minor; the device appears'
complete -c tap-ctl -n "__fish_tap_ctl_needs_command" -f -a "close" -d 'Close a minor\'s image; the device goes away'
complete -c tap-ctl -n "__fish_tap_ctl_needs_command" -f -a "create" -d 'allocate + spawn + attach + open; prints the device path'
complete -c tap-ctl -n "__fish_tap_ctl_needs_command" -f -a "destroy" -d 'close + detach + free (also for a dead tapdisk)'
complete -c tap-ctl -n "__fish_tap_ctl_needs_command" -f -a "pause" -d 'Quiesce I/O and close the image (for offline snapshot or coalesce)'
complete -c tap-ctl -n "__fish_tap_ctl_needs_command" -f -a "unpause" -d 'Reopen a paused image, optionally at a new path of the same size'
complete -c tap-ctl -n "__fish_tap_ctl_needs_command" -f -a "list" -d 'List tapdisks and minors: "pid minor state type file" (on a terminal a -2 mirror adds a line: "mirror STATE URI")'
complete -c tap-ctl -n "__fish_tap_ctl_needs_command" -f -a "stats" -d 'Print a minor\'s I/O statistics as JSON'
complete -c tap-ctl -n "__fish_tap_ctl_needs_command" -f -a "throttle" -d 'Change a disk\'s or a tenant\'s I/O limits now (admin only; audited). Prints the limits in force afterwards'
complete -c tap-ctl -n "__fish_tap_ctl_needs_command" -f -a "major" -d 'Print the block major number of this host\'s tapjail devices'
complete -c tap-ctl -n "__fish_tap_ctl_needs_command" -f -a "snapshot" -d 'Online snapshot: create CHILD, a differencing child of the open leaf, and make it the leaf while the disk serves. Prints how long I/O was held'
complete -c tap-ctl -n "__fish_tap_ctl_needs_command" -f -a "coalesce" -d 'Online coalesce: merge the open leaf and its parent while the disk serves. Waits until done; `tap-ctl stats` shows progress meanwhile'
complete -c tap-ctl -n "__fish_tap_ctl_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and not __fish_seen_subcommand_from create snapshot query check repair read write convert coalesce resize set-parent key confine-check help" -l socket -d 'tap-broker\'s control socket' -r -F
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and not __fish_seen_subcommand_from create snapshot query check repair read write convert coalesce resize set-parent key confine-check help" -l timeout -d 'Seconds to wait for tap-broker\'s answer before giving up' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and not __fish_seen_subcommand_from create snapshot query check repair read write convert coalesce resize set-parent key confine-check help" -s q -l quiet -d 'No progress bar (one is drawn only when stdout and stderr are both terminals anyway)'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and not __fish_seen_subcommand_from create snapshot query check repair read write convert coalesce resize set-parent key confine-check help" -s h -l help -d 'Print help'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and not __fish_seen_subcommand_from create snapshot query check repair read write convert coalesce resize set-parent key confine-check help" -f -a "create" -d 'Create a new image (dynamic unless --fixed)'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and not __fish_seen_subcommand_from create snapshot query check repair read write convert coalesce resize set-parent key confine-check help" -f -a "snapshot" -d 'Create a differencing child of PARENT'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and not __fish_seen_subcommand_from create snapshot query check repair read write convert coalesce resize set-parent key confine-check help" -f -a "query" -d 'Show what an image is'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and not __fish_seen_subcommand_from create snapshot query check repair read write convert coalesce resize set-parent key confine-check help" -f -a "check" -d 'Check consistency; exits non-zero and lists every problem found'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and not __fish_seen_subcommand_from create snapshot query check repair read write convert coalesce resize set-parent key confine-check help" -f -a "repair" -d 'Fix footers and batmaps; reports what is left'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and not __fish_seen_subcommand_from create snapshot query check repair read write convert coalesce resize set-parent key confine-check help" -f -a "read" -d 'Write LENGTH bytes at OFFSET of the virtual disk to stdout'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and not __fish_seen_subcommand_from create snapshot query check repair read write convert coalesce resize set-parent key confine-check help" -f -a "write" -d 'Write stdin (at most 64 MiB) into the virtual disk at OFFSET, all or nothing: the whole input is read and checked first, and a write that fails part-way puts the previous contents back'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and not __fish_seen_subcommand_from create snapshot query check repair read write convert coalesce resize set-parent key confine-check help" -f -a "convert" -d 'Convert SRC (raw or VHD: -f, or probed without guessing) into a new file DST'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and not __fish_seen_subcommand_from create snapshot query check repair read write convert coalesce resize set-parent key confine-check help" -f -a "coalesce" -d 'Merge a differencing image into its parent'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and not __fish_seen_subcommand_from create snapshot query check repair read write convert coalesce resize set-parent key confine-check help" -f -a "resize" -d 'Grow an image to SIZE MiB'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and not __fish_seen_subcommand_from create snapshot query check repair read write convert coalesce resize set-parent key confine-check help" -f -a "set-parent" -d 'Make NEWPARENT the parent of a differencing image'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and not __fish_seen_subcommand_from create snapshot query check repair read write convert coalesce resize set-parent key confine-check help" -f -a "key" -d 'Set (-s), check (-c) or print (-p) the keyhash of blktap\'s encrypted VHDs, or calculate one (-C), like `vhd-util key`'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and not __fish_seen_subcommand_from create snapshot query check repair read write convert coalesce resize set-parent key confine-check help" -f -a "confine-check" -d 'Confine as the image verbs do, then try to open PATH: shows that the parser can open nothing (exits 0 when the open is refused)'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and not __fish_seen_subcommand_from create snapshot query check repair read write convert coalesce resize set-parent key confine-check help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from create" -s n -l name -d 'The image' -r -F
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from create" -s s -l size -d 'Virtual size in MiB' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from create" -l block-size -d 'Block size in bytes (power of two; dynamic images)' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from create" -l socket -d 'tap-broker\'s control socket' -r -F
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from create" -l timeout -d 'Seconds to wait for tap-broker\'s answer before giving up' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from create" -l fixed -d 'Allocate all space up front (a fixed VHD)'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from create" -s q -l quiet -d 'No progress bar (one is drawn only when stdout and stderr are both terminals anyway)'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from create" -s h -l help -d 'Print help'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from snapshot" -s n -l name -d 'The image (a differencing child)' -r -F
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from snapshot" -s p -l parent -d 'The parent image the child is based on' -r -F
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from snapshot" -l block-size -d 'Block size in bytes (power of two; blktap uses only 2 MiB)' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from snapshot" -l socket -d 'tap-broker\'s control socket' -r -F
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from snapshot" -l timeout -d 'Seconds to wait for tap-broker\'s answer before giving up' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from snapshot" -s m -l raw-parent -d 'PARENT is a raw disk image, not a VHD (vhd-util snapshot -m); the child is as large as the file'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from snapshot" -s q -l quiet -d 'No progress bar (one is drawn only when stdout and stderr are both terminals anyway)'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from snapshot" -s h -l help -d 'Print help'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from query" -s n -l name -d 'The image' -r -F
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from query" -l parent-path -d 'The parent image, wherever it is (only relative locators beneath the image\'s directory are followed otherwise)' -r -F
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from query" -l socket -d 'tap-broker\'s control socket' -r -F
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from query" -l timeout -d 'Seconds to wait for tap-broker\'s answer before giving up' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from query" -l json -d 'Print one JSON object: "file", "virtual_size", "type", "parent", "parent_resolved", "parent_uuid", "parent_raw", "block_size", "blktap_compatible_block_size", "allocated_blocks", "physical_size", "uuid", "creator", "batmap" (sizes in bytes; null where the image has none); -v, -s and -p are then ignored'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from query" -s v -l virtual-size -d 'Print only the virtual size in MiB (vhd-util -v)'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from query" -s s -l physical-size -d 'Print only the physical size in bytes (vhd-util -s)'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from query" -s p -l parent -d 'Print only the parent (vhd-util -p)'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from query" -s q -l quiet -d 'No progress bar (one is drawn only when stdout and stderr are both terminals anyway)'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from query" -s h -l help -d 'Print help'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from check" -s n -l name -d 'The image' -r -F
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from check" -l parent -l parent-path -d 'The parent image, wherever it is (otherwise only relative parent locators to a file beneath the image\'s directory are followed)' -r -F
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from check" -l socket -d 'tap-broker\'s control socket' -r -F
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from check" -l timeout -d 'Seconds to wait for tap-broker\'s answer before giving up' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from check" -l json -d 'Print one JSON object: "file", "valid", "problems" (each {"field", "message", "fix": "repair" | "set-parent" | "none", "hint"})'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from check" -s q -l quiet -d 'No progress bar (one is drawn only when stdout and stderr are both terminals anyway)'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from check" -s h -l help -d 'Print help'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from repair" -s n -l name -d 'The image' -r -F
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from repair" -l socket -d 'tap-broker\'s control socket' -r -F
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from repair" -l timeout -d 'Seconds to wait for tap-broker\'s answer before giving up' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from repair" -l json -d 'Print one JSON object: "file", "actions" (what was fixed), "remaining" (problems left, as `check --json` lists them), "ok"'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from repair" -s q -l quiet -d 'No progress bar (one is drawn only when stdout and stderr are both terminals anyway)'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from repair" -s h -l help -d 'Print help'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from read" -s n -l name -d 'The image' -r -F
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from read" -s o -l offset -d 'Where in the virtual disk, in bytes' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from read" -s l -l length -d 'How many bytes' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from read" -s f -l format -d 'The image\'s format; without it a file showing any sign of a VHD is opened as one (never silently as raw)' -r -f -a "raw\t''
vhd\t''"
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from read" -l parent -l parent-path -d 'The parent image, wherever it is (otherwise only relative parent locators to a file beneath the image\'s directory are followed)' -r -F
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from read" -l socket -d 'tap-broker\'s control socket' -r -F
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from read" -l timeout -d 'Seconds to wait for tap-broker\'s answer before giving up' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from read" -s q -l quiet -d 'No progress bar (one is drawn only when stdout and stderr are both terminals anyway)'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from read" -s h -l help -d 'Print help'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from write" -s n -l name -d 'The image' -r -F
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from write" -s o -l offset -d 'Where in the virtual disk, in bytes' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from write" -s l -l length -d 'Expect exactly this many bytes on stdin; write nothing otherwise' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from write" -s f -l format -d 'The image\'s format; without it a file showing any sign of a VHD is opened as one (never silently as raw)' -r -f -a "raw\t''
vhd\t''"
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from write" -l parent -l parent-path -d 'The parent image, wherever it is (otherwise only relative parent locators to a file beneath the image\'s directory are followed)' -r -F
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from write" -l socket -d 'tap-broker\'s control socket' -r -F
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from write" -l timeout -d 'Seconds to wait for tap-broker\'s answer before giving up' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from write" -s q -l quiet -d 'No progress bar (one is drawn only when stdout and stderr are both terminals anyway)'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from write" -s h -l help -d 'Print help'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from convert" -s O -l output-format -d 'Output format' -r -f -a "raw\t''
vhd\t''"
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from convert" -l block-size -d 'Block size in bytes (power of two; blktap uses only 2 MiB)' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from convert" -s f -l format -d 'The image\'s format; without it a file showing any sign of a VHD is opened as one (never silently as raw)' -r -f -a "raw\t''
vhd\t''"
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from convert" -l parent -l parent-path -d 'The parent image, wherever it is (otherwise only relative parent locators to a file beneath the image\'s directory are followed)' -r -F
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from convert" -l socket -d 'tap-broker\'s control socket' -r -F
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from convert" -l timeout -d 'Seconds to wait for tap-broker\'s answer before giving up' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from convert" -l fixed -d 'With -O vhd: a fixed VHD instead of a dynamic one'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from convert" -l sync -d 'Make the output durable (fdatasync) before exiting'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from convert" -s q -l quiet -d 'No progress bar (one is drawn only when stdout and stderr are both terminals anyway)'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from convert" -s h -l help -d 'Print help'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from coalesce" -s n -l name -d 'The image (a differencing child)' -r -F
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from coalesce" -l parent -l parent-path -d 'The parent image, wherever it is (otherwise only relative parent locators to a file beneath the image\'s directory are followed)' -r -F
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from coalesce" -l socket -d 'tap-broker\'s control socket' -r -F
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from coalesce" -l timeout -d 'Seconds to wait for tap-broker\'s answer before giving up' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from coalesce" -l json -d 'Print one JSON object: "file", "parent", "bytes_merged"'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from coalesce" -s q -l quiet -d 'No progress bar (one is drawn only when stdout and stderr are both terminals anyway)'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from coalesce" -s h -l help -d 'Print help'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from resize" -s n -l name -d 'The image' -r -F
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from resize" -s s -l size -d 'The new virtual size in MiB (only growing)' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from resize" -l socket -d 'tap-broker\'s control socket' -r -F
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from resize" -l timeout -d 'Seconds to wait for tap-broker\'s answer before giving up' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from resize" -s q -l quiet -d 'No progress bar (one is drawn only when stdout and stderr are both terminals anyway)'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from resize" -s h -l help -d 'Print help'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from set-parent" -s n -l name -d 'The image (a differencing child)' -r -F
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from set-parent" -s p -l parent -d 'The new parent image' -r -F
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from set-parent" -l socket -d 'tap-broker\'s control socket' -r -F
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from set-parent" -l timeout -d 'Seconds to wait for tap-broker\'s answer before giving up' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from set-parent" -s m -l raw-parent -d 'NEWPARENT is a raw disk image, not a VHD (vhd-util modify -m)'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from set-parent" -s q -l quiet -d 'No progress bar (one is drawn only when stdout and stderr are both terminals anyway)'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from set-parent" -s h -l help -d 'Print help'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from key" -s n -l name -d 'The image (dynamic or differencing; not needed with -C)' -r -F
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from key" -s k -l key -d 'The key file (32 or 64 raw bytes), `-` for stdin' -r -F
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from key" -s N -l nonce -d 'The nonce (64 hex digits) for -s or -C; random if not given' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from key" -l socket -d 'tap-broker\'s control socket' -r -F
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from key" -l timeout -d 'Seconds to wait for tap-broker\'s answer before giving up' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from key" -s s -d 'Set the image\'s keyhash from the key (the image must be empty)'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from key" -s c -d 'Check the key against the image\'s keyhash (exit 1 if not)'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from key" -s p -d 'Print the image\'s nonce and hash (`none` without a keyhash)'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from key" -s C -d 'Print the keyhash of the key (with -N\'s nonce) without an image'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from key" -s q -l quiet -d 'No progress bar (one is drawn only when stdout and stderr are both terminals anyway)'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from key" -s h -l help -d 'Print help'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from confine-check" -l socket -d 'tap-broker\'s control socket' -r -F
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from confine-check" -l timeout -d 'Seconds to wait for tap-broker\'s answer before giving up' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from confine-check" -s q -l quiet -d 'No progress bar (one is drawn only when stdout and stderr are both terminals anyway)'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from confine-check" -s h -l help -d 'Print help'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from help" -f -a "create" -d 'Create a new image (dynamic unless --fixed)'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from help" -f -a "snapshot" -d 'Create a differencing child of PARENT'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from help" -f -a "query" -d 'Show what an image is'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from help" -f -a "check" -d 'Check consistency; exits non-zero and lists every problem found'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from help" -f -a "repair" -d 'Fix footers and batmaps; reports what is left'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from help" -f -a "read" -d 'Write LENGTH bytes at OFFSET of the virtual disk to stdout'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from help" -f -a "write" -d 'Write stdin (at most 64 MiB) into the virtual disk at OFFSET, all or nothing: the whole input is read and checked first, and a write that fails part-way puts the previous contents back'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from help" -f -a "convert" -d 'Convert SRC (raw or VHD: -f, or probed without guessing) into a new file DST'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from help" -f -a "coalesce" -d 'Merge a differencing image into its parent'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from help" -f -a "resize" -d 'Grow an image to SIZE MiB'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from help" -f -a "set-parent" -d 'Make NEWPARENT the parent of a differencing image'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from help" -f -a "key" -d 'Set (-s), check (-c) or print (-p) the keyhash of blktap\'s encrypted VHDs, or calculate one (-C), like `vhd-util key`'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from help" -f -a "confine-check" -d 'Confine as the image verbs do, then try to open PATH: shows that the parser can open nothing (exits 0 when the open is refused)'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand vhd; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand policy; and not __fish_seen_subcommand_from check help" -l socket -d 'tap-broker\'s control socket' -r -F
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand policy; and not __fish_seen_subcommand_from check help" -l timeout -d 'Seconds to wait for tap-broker\'s answer before giving up' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand policy; and not __fish_seen_subcommand_from check help" -s h -l help -d 'Print help'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand policy; and not __fish_seen_subcommand_from check help" -f -a "check" -d 'Validate a policy file; problems are printed as FILE:LINE:COL: message'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand policy; and not __fish_seen_subcommand_from check help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand policy; and __fish_seen_subcommand_from check" -l socket -d 'tap-broker\'s control socket' -r -F
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand policy; and __fish_seen_subcommand_from check" -l timeout -d 'Seconds to wait for tap-broker\'s answer before giving up' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand policy; and __fish_seen_subcommand_from check" -l json -d 'Print one JSON object: "file", "ok", "tenants", "worker_uids" [first, last], "socket" (null when invalid), "warnings" and "errors", each a list of {"line", "column", "message"} (line 0: no place in the file)'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand policy; and __fish_seen_subcommand_from check" -s h -l help -d 'Print help'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand policy; and __fish_seen_subcommand_from help" -f -a "check" -d 'Validate a policy file; problems are printed as FILE:LINE:COL: message'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand policy; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand audit; and not __fish_seen_subcommand_from verify help" -l socket -d 'tap-broker\'s control socket' -r -F
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand audit; and not __fish_seen_subcommand_from verify help" -l timeout -d 'Seconds to wait for tap-broker\'s answer before giving up' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand audit; and not __fish_seen_subcommand_from verify help" -s h -l help -d 'Print help'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand audit; and not __fish_seen_subcommand_from verify help" -f -a "verify" -d 'Check an audit log\'s hash chain; names the first broken line. Rotated files are given oldest first (`audit.jsonl.2 audit.jsonl.1 audit.jsonl`): each must continue the chain of the one before'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand audit; and not __fish_seen_subcommand_from verify help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand audit; and __fish_seen_subcommand_from verify" -l socket -d 'tap-broker\'s control socket' -r -F
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand audit; and __fish_seen_subcommand_from verify" -l timeout -d 'Seconds to wait for tap-broker\'s answer before giving up' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand audit; and __fish_seen_subcommand_from verify" -l json -d 'Print one JSON object: "ok", "files" (each {"file", "lines", "head" = the last line\'s SHA-256, "continues" = the previous file\'s name or null}), "broken" ({"file", "line", "message"} or null)'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand audit; and __fish_seen_subcommand_from verify" -s h -l help -d 'Print help'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand audit; and __fish_seen_subcommand_from help" -f -a "verify" -d 'Check an audit log\'s hash chain; names the first broken line. Rotated files are given oldest first (`audit.jsonl.2 audit.jsonl.1 audit.jsonl`): each must continue the chain of the one before'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand audit; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand metrics" -s o -d 'Write to PATH atomically (temp file + rename, for node_exporter\'s textfile collector) instead of standard output' -r -F
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand metrics" -l listen -d 'Serve the exposition over HTTP at ADDR (such as 127.0.0.1:9477) for Prometheus to scrape, until killed: GET /metrics only, each scrape showing what this user may see' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand metrics" -l socket -d 'tap-broker\'s control socket' -r -F
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand metrics" -l timeout -d 'Seconds to wait for tap-broker\'s answer before giving up' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand metrics" -l json -d 'Print the same figures as one JSON array instead: per disk its `list --json` row under "disk" and its `stats` document under "stats" (null when the tapdisk did not answer)'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand metrics" -s h -l help -d 'Print help'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand cbt; and not __fish_seen_subcommand_from start checkpoint stop list help" -l socket -d 'tap-broker\'s control socket' -r -F
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand cbt; and not __fish_seen_subcommand_from start checkpoint stop list help" -l timeout -d 'Seconds to wait for tap-broker\'s answer before giving up' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand cbt; and not __fish_seen_subcommand_from start checkpoint stop list help" -s h -l help -d 'Print help'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand cbt; and not __fish_seen_subcommand_from start checkpoint stop list help" -f -a "start" -d 'Start a new, empty bitmap NAME (file LEAF.NAME.cbt next to the image)'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand cbt; and not __fish_seen_subcommand_from start checkpoint stop list help" -f -a "checkpoint" -d 'Clear bitmap NAME: it holds the blocks written from now on'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand cbt; and not __fish_seen_subcommand_from start checkpoint stop list help" -f -a "stop" -d 'Stop tracking into NAME (its file is left for a last backup)'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand cbt; and not __fish_seen_subcommand_from start checkpoint stop list help" -f -a "list" -d 'Print the disk\'s bitmaps: name, granularity, dirty blocks'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand cbt; and not __fish_seen_subcommand_from start checkpoint stop list help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand cbt; and __fish_seen_subcommand_from start" -s m -d 'The disk\'s minor' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand cbt; and __fish_seen_subcommand_from start" -l name -d 'The bitmap (NBD clients read it as `qemu:dirty-bitmap:NAME`)' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand cbt; and __fish_seen_subcommand_from start" -l socket -d 'tap-broker\'s control socket' -r -F
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand cbt; and __fish_seen_subcommand_from start" -l timeout -d 'Seconds to wait for tap-broker\'s answer before giving up' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand cbt; and __fish_seen_subcommand_from start" -s h -l help -d 'Print help'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand cbt; and __fish_seen_subcommand_from checkpoint" -s m -d 'The disk\'s minor' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand cbt; and __fish_seen_subcommand_from checkpoint" -l name -d 'The bitmap (NBD clients read it as `qemu:dirty-bitmap:NAME`)' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand cbt; and __fish_seen_subcommand_from checkpoint" -l socket -d 'tap-broker\'s control socket' -r -F
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand cbt; and __fish_seen_subcommand_from checkpoint" -l timeout -d 'Seconds to wait for tap-broker\'s answer before giving up' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand cbt; and __fish_seen_subcommand_from checkpoint" -s h -l help -d 'Print help'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand cbt; and __fish_seen_subcommand_from stop" -s m -d 'The disk\'s minor' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand cbt; and __fish_seen_subcommand_from stop" -l name -d 'The bitmap (NBD clients read it as `qemu:dirty-bitmap:NAME`)' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand cbt; and __fish_seen_subcommand_from stop" -l socket -d 'tap-broker\'s control socket' -r -F
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand cbt; and __fish_seen_subcommand_from stop" -l timeout -d 'Seconds to wait for tap-broker\'s answer before giving up' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand cbt; and __fish_seen_subcommand_from stop" -s h -l help -d 'Print help'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand cbt; and __fish_seen_subcommand_from list" -s m -d 'The disk\'s minor' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand cbt; and __fish_seen_subcommand_from list" -l socket -d 'tap-broker\'s control socket' -r -F
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand cbt; and __fish_seen_subcommand_from list" -l timeout -d 'Seconds to wait for tap-broker\'s answer before giving up' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand cbt; and __fish_seen_subcommand_from list" -l json -d 'One JSON array, for machines'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand cbt; and __fish_seen_subcommand_from list" -s h -l help -d 'Print help'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand cbt; and __fish_seen_subcommand_from help" -f -a "start" -d 'Start a new, empty bitmap NAME (file LEAF.NAME.cbt next to the image)'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand cbt; and __fish_seen_subcommand_from help" -f -a "checkpoint" -d 'Clear bitmap NAME: it holds the blocks written from now on'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand cbt; and __fish_seen_subcommand_from help" -f -a "stop" -d 'Stop tracking into NAME (its file is left for a last backup)'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand cbt; and __fish_seen_subcommand_from help" -f -a "list" -d 'Print the disk\'s bitmaps: name, granularity, dirty blocks'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand cbt; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand allocate" -s m -d 'Ask for this minor instead of the lowest free one' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand allocate" -s d -d 'Ask for the minor this device path names (DIR/tapdevN)' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand allocate" -l socket -d 'tap-broker\'s control socket' -r -F
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand allocate" -l timeout -d 'Seconds to wait for tap-broker\'s answer before giving up' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand allocate" -l json -d 'Print {"minor": N, "device": PATH} instead of the device path'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand allocate" -s h -l help -d 'Print help'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand free" -s m -d 'The disk\'s minor number (0..16383), as `tap-ctl list` shows it' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand free" -l socket -d 'tap-broker\'s control socket' -r -F
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand free" -l timeout -d 'Seconds to wait for tap-broker\'s answer before giving up' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand free" -s h -l help -d 'Print help'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand spawn" -l socket -d 'tap-broker\'s control socket' -r -F
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand spawn" -l timeout -d 'Seconds to wait for tap-broker\'s answer before giving up' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand spawn" -l json -d 'Print {"pid": N} instead of the pid'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand spawn" -s h -l help -d 'Print help'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand attach" -s p -d 'The tapdisk, as `tap-ctl spawn` or `tap-ctl list` shows it' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand attach" -s m -d 'The disk\'s minor number (0..16383), as `tap-ctl list` shows it' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand attach" -l socket -d 'tap-broker\'s control socket' -r -F
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand attach" -l timeout -d 'Seconds to wait for tap-broker\'s answer before giving up' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand attach" -s h -l help -d 'Print help'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand detach" -s p -d 'The minor\'s tapdisk, as `tap-ctl list` shows it (optional: the minor alone names it)' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand detach" -s m -d 'The disk\'s minor number (0..16383), as `tap-ctl list` shows it' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand detach" -l socket -d 'tap-broker\'s control socket' -r -F
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand detach" -l timeout -d 'Seconds to wait for tap-broker\'s answer before giving up' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand detach" -s h -l help -d 'Print help'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand open" -s p -d 'The minor\'s tapdisk, as `tap-ctl list` shows it (optional: the minor alone names it)' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand open" -s m -d 'The disk\'s minor number (0..16383), as `tap-ctl list` shows it' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand open" -s a -d 'TYPE:PATH, TYPE being vhd or aio (raw)' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand open" -s t -d 'Fail with "timed out" (exit 110) if the tapdisk has not answered within SECS; `list` then shows the minor\'s state' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand open" -s e -d 'Share the open parent chain of this minor (same tenant, read-only)' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand open" -s 2 -d 'Mirror every write to this NBD secondary (nbd:/path/to/socket or nbd:IPV4:PORT) and copy the existing data over in the background' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand open" -s C -d 'Track changed blocks into this blktap CBT log (made by `cbt-util create`)' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand open" -l socket -d 'tap-broker\'s control socket' -r -F
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand open" -l timeout -d 'Seconds to wait for tap-broker\'s answer before giving up' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand open" -s R -d 'Read-only'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand open" -s D -d 'Open the images without O_DIRECT (through the page cache)'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand open" -s r -d 'Serve the image as a local read cache of its parent chain (XAPI\'s IntelliCache): reads the cache lacks come from the parent and are written into it; read-only to the guest. The image must lie beneath the tenant\'s read_cache_root'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand open" -s s -d 'With -2: standby, blktap\'s meaning: the secondary is written only once the primary runs out of space, and then serves the disk'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand open" -s E -d 'Read an encryption key (32 or 64 bytes: AES-128/256-XTS) from stdin and serve blktap\'s encrypted VHDs with it'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand open" -s h -l help -d 'Print help'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand close" -s p -d 'The minor\'s tapdisk, as `tap-ctl list` shows it (optional: the minor alone names it)' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand close" -s m -d 'The disk\'s minor number (0..16383), as `tap-ctl list` shows it' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand close" -s t -d 'Fail with "timed out" (exit 110) if the tapdisk has not answered within SECS; `list` then shows the minor\'s state' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand close" -l socket -d 'tap-broker\'s control socket' -r -F
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand close" -l timeout -d 'Seconds to wait for tap-broker\'s answer before giving up' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand close" -s f -d 'Close even if the tapdisk does not answer (it is then killed)'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand close" -s h -l help -d 'Print help'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand create" -s a -d 'TYPE:PATH, TYPE being vhd or aio (raw)' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand create" -s e -d 'Use this minor' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand create" -l socket -d 'tap-broker\'s control socket' -r -F
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand create" -l timeout -d 'Seconds to wait for tap-broker\'s answer before giving up' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand create" -s R -d 'Read-only'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand create" -l json -d 'Print {"minor": N, "pid": N, "device": PATH} instead of the device path'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand create" -s h -l help -d 'Print help'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand destroy" -s p -d 'The minor\'s tapdisk, as `tap-ctl list` shows it (optional: the minor alone names it)' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand destroy" -s m -d 'The disk\'s minor number (0..16383), as `tap-ctl list` shows it' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand destroy" -l socket -d 'tap-broker\'s control socket' -r -F
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand destroy" -l timeout -d 'Seconds to wait for tap-broker\'s answer before giving up' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand destroy" -s h -l help -d 'Print help'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand pause" -s p -d 'The minor\'s tapdisk, as `tap-ctl list` shows it (optional: the minor alone names it)' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand pause" -s m -d 'The disk\'s minor number (0..16383), as `tap-ctl list` shows it' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand pause" -s t -d 'Fail with "timed out" (exit 110) if the tapdisk has not answered within SECS; `list` then shows the minor\'s state' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand pause" -l socket -d 'tap-broker\'s control socket' -r -F
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand pause" -l timeout -d 'Seconds to wait for tap-broker\'s answer before giving up' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand pause" -s h -l help -d 'Print help'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand unpause" -s p -d 'The minor\'s tapdisk, as `tap-ctl list` shows it (optional: the minor alone names it)' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand unpause" -s m -d 'The disk\'s minor number (0..16383), as `tap-ctl list` shows it' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand unpause" -s a -d 'Reopen this image instead (TYPE:PATH; same virtual size)' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand unpause" -s t -d 'Fail with "timed out" (exit 110) if the tapdisk has not answered within SECS; `list` then shows the minor\'s state' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand unpause" -s 2 -d 'Serve from this mirror secondary once it is in sync (the minor mirrors to it), or start mirroring to it (the minor mirrors nothing)' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand unpause" -s c -d 'Track changed blocks into this blktap CBT log from now on' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand unpause" -l socket -d 'tap-broker\'s control socket' -r -F
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand unpause" -l timeout -d 'Seconds to wait for tap-broker\'s answer before giving up' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand unpause" -s E -d 'Read an encryption key (32 or 64 bytes) from stdin for the image reopened (e.g. a new -a leaf with another key); kept only if the reopen succeeds, else the disk stays paused with its old key'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand unpause" -s h -l help -d 'Print help'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand list" -s p -d 'Only this tapdisk\'s rows. The minor\'s tapdisk, as `tap-ctl list` shows it (optional: the minor alone names it)' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand list" -s m -d 'Only this minor\'s rows' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand list" -s t -d 'Only rows of this image type (vhd, or aio = raw)' -r -f -a "vhd\t''
aio\t''
raw\t''"
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand list" -s f -d 'Only rows of this image file' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand list" -l socket -d 'tap-broker\'s control socket' -r -F
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand list" -l timeout -d 'Seconds to wait for tap-broker\'s answer before giving up' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand list" -l json -d 'Print one JSON array, a row per tapdisk or minor: {"pid", "minor", "state" (blktap\'s state bits as a number), "type" (vhd or aio), "file", "read_only", "frontend" (ublk, fuse or nbd), "device", "restarts", "mirror" ({"uri", "mode", "state": copying, synced, standby, failed-over, failed or unknown, "copied", "total", "error"} for a -2 mirror)}; null for what is missing'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand list" -s h -l help -d 'Print help'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand stats" -s p -d 'The minor\'s tapdisk, as `tap-ctl list` shows it (optional: the minor alone names it)' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand stats" -s m -d 'The disk\'s minor number (0..16383), as `tap-ctl list` shows it' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand stats" -l socket -d 'tap-broker\'s control socket' -r -F
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand stats" -l timeout -d 'Seconds to wait for tap-broker\'s answer before giving up' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand stats" -l json -d 'Accepted for consistency: stats always prints its JSON document'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand stats" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand throttle" -s m -d 'This disk\'s own limits (overriding its tenant\'s per-disk default)' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand throttle" -l tenant -d 'The limits all of this tenant\'s disks share' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand throttle" -l read-iops -d 'Read requests per second' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand throttle" -l write-iops -d 'Write requests per second' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand throttle" -l read-bps -d 'Bytes read per second' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand throttle" -l write-bps -d 'Bytes written per second' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand throttle" -l socket -d 'tap-broker\'s control socket' -r -F
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand throttle" -l timeout -d 'Seconds to wait for tap-broker\'s answer before giving up' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand throttle" -l json -d 'Print the limits in force as one JSON object: "read_iops", "write_iops", "read_bps", "write_bps", each {"per_sec": N, "burst": N} or null for no limit'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand throttle" -s h -l help -d 'Print help'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand major" -l socket -d 'tap-broker\'s control socket' -r -F
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand major" -l timeout -d 'Seconds to wait for tap-broker\'s answer before giving up' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand major" -l json -d 'Print {"major": N} instead of the number'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand major" -s h -l help -d 'Print help'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand snapshot" -s p -d 'The tapdisk\'s pid, as `tap-ctl list` shows it (checked if given)' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand snapshot" -s m -d 'The disk\'s minor number (0..16383), as `tap-ctl list` shows it' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand snapshot" -s n -d 'The new child image (must not exist; beneath your image roots)' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand snapshot" -l socket -d 'tap-broker\'s control socket' -r -F
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand snapshot" -l timeout -d 'Seconds to wait for tap-broker\'s answer before giving up' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand snapshot" -l json -d 'Print {"child", "chain", "stall_us"} instead of a sentence'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand snapshot" -s h -l help -d 'Print help'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand coalesce" -s p -d 'The tapdisk\'s pid, as `tap-ctl list` shows it (checked if given)' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand coalesce" -s m -d 'The disk\'s minor number (0..16383), as `tap-ctl list` shows it' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand coalesce" -l rate -d 'Copy at most this many MiB per second (default 64)' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand coalesce" -l socket -d 'tap-broker\'s control socket' -r -F
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand coalesce" -l timeout -d 'Seconds to wait for tap-broker\'s answer before giving up' -r
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand coalesce" -l stream -d 'Copy the parent into the leaf (qemu\'s block-stream)'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand coalesce" -l commit -d 'Copy the leaf into its parent (qemu\'s block-commit)'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand coalesce" -l json -d 'Print {"direction", "chain", "copied_bytes", "stall_us", "restarts"}'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand coalesce" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand help; and not __fish_seen_subcommand_from vhd policy audit metrics cbt allocate free spawn attach detach open close create destroy pause unpause list stats throttle major snapshot coalesce help" -f -a "vhd" -d 'Offline VHD image tools (vhd-util\'s verbs)'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand help; and not __fish_seen_subcommand_from vhd policy audit metrics cbt allocate free spawn attach detach open close create destroy pause unpause list stats throttle major snapshot coalesce help" -f -a "policy" -d 'Check a tap-broker policy file'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand help; and not __fish_seen_subcommand_from vhd policy audit metrics cbt allocate free spawn attach detach open close create destroy pause unpause list stats throttle major snapshot coalesce help" -f -a "audit" -d 'Check a tap-broker audit log'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand help; and not __fish_seen_subcommand_from vhd policy audit metrics cbt allocate free spawn attach detach open close create destroy pause unpause list stats throttle major snapshot coalesce help" -f -a "metrics" -d 'Print every visible disk\'s counters and latency histograms in Prometheus\' text format'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand help; and not __fish_seen_subcommand_from vhd policy audit metrics cbt allocate free spawn attach detach open close create destroy pause unpause list stats throttle major snapshot coalesce help" -f -a "cbt" -d 'Changed-block tracking of a disk, for incremental backup'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand help; and not __fish_seen_subcommand_from vhd policy audit metrics cbt allocate free spawn attach detach open close create destroy pause unpause list stats throttle major snapshot coalesce help" -f -a "allocate" -d 'Allocate a minor; prints its device path'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand help; and not __fish_seen_subcommand_from vhd policy audit metrics cbt allocate free spawn attach detach open close create destroy pause unpause list stats throttle major snapshot coalesce help" -f -a "free" -d 'Release a minor (it must be detached)'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand help; and not __fish_seen_subcommand_from vhd policy audit metrics cbt allocate free spawn attach detach open close create destroy pause unpause list stats throttle major snapshot coalesce help" -f -a "spawn" -d 'Start a tapdisk worker; prints its pid'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand help; and not __fish_seen_subcommand_from vhd policy audit metrics cbt allocate free spawn attach detach open close create destroy pause unpause list stats throttle major snapshot coalesce help" -f -a "attach" -d 'Attach a tapdisk to a minor'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand help; and not __fish_seen_subcommand_from vhd policy audit metrics cbt allocate free spawn attach detach open close create destroy pause unpause list stats throttle major snapshot coalesce help" -f -a "detach" -d 'Detach a minor\'s tapdisk; this ends that tapdisk'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand help; and not __fish_seen_subcommand_from vhd policy audit metrics cbt allocate free spawn attach detach open close create destroy pause unpause list stats throttle major snapshot coalesce help" -f -a "open" -d 'Open an image on an attached minor; the device appears'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand help; and not __fish_seen_subcommand_from vhd policy audit metrics cbt allocate free spawn attach detach open close create destroy pause unpause list stats throttle major snapshot coalesce help" -f -a "close" -d 'Close a minor\'s image; the device goes away'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand help; and not __fish_seen_subcommand_from vhd policy audit metrics cbt allocate free spawn attach detach open close create destroy pause unpause list stats throttle major snapshot coalesce help" -f -a "create" -d 'allocate + spawn + attach + open; prints the device path'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand help; and not __fish_seen_subcommand_from vhd policy audit metrics cbt allocate free spawn attach detach open close create destroy pause unpause list stats throttle major snapshot coalesce help" -f -a "destroy" -d 'close + detach + free (also for a dead tapdisk)'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand help; and not __fish_seen_subcommand_from vhd policy audit metrics cbt allocate free spawn attach detach open close create destroy pause unpause list stats throttle major snapshot coalesce help" -f -a "pause" -d 'Quiesce I/O and close the image (for offline snapshot or coalesce)'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand help; and not __fish_seen_subcommand_from vhd policy audit metrics cbt allocate free spawn attach detach open close create destroy pause unpause list stats throttle major snapshot coalesce help" -f -a "unpause" -d 'Reopen a paused image, optionally at a new path of the same size'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand help; and not __fish_seen_subcommand_from vhd policy audit metrics cbt allocate free spawn attach detach open close create destroy pause unpause list stats throttle major snapshot coalesce help" -f -a "list" -d 'List tapdisks and minors: "pid minor state type file" (on a terminal a -2 mirror adds a line: "mirror STATE URI")'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand help; and not __fish_seen_subcommand_from vhd policy audit metrics cbt allocate free spawn attach detach open close create destroy pause unpause list stats throttle major snapshot coalesce help" -f -a "stats" -d 'Print a minor\'s I/O statistics as JSON'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand help; and not __fish_seen_subcommand_from vhd policy audit metrics cbt allocate free spawn attach detach open close create destroy pause unpause list stats throttle major snapshot coalesce help" -f -a "throttle" -d 'Change a disk\'s or a tenant\'s I/O limits now (admin only; audited). Prints the limits in force afterwards'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand help; and not __fish_seen_subcommand_from vhd policy audit metrics cbt allocate free spawn attach detach open close create destroy pause unpause list stats throttle major snapshot coalesce help" -f -a "major" -d 'Print the block major number of this host\'s tapjail devices'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand help; and not __fish_seen_subcommand_from vhd policy audit metrics cbt allocate free spawn attach detach open close create destroy pause unpause list stats throttle major snapshot coalesce help" -f -a "snapshot" -d 'Online snapshot: create CHILD, a differencing child of the open leaf, and make it the leaf while the disk serves. Prints how long I/O was held'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand help; and not __fish_seen_subcommand_from vhd policy audit metrics cbt allocate free spawn attach detach open close create destroy pause unpause list stats throttle major snapshot coalesce help" -f -a "coalesce" -d 'Online coalesce: merge the open leaf and its parent while the disk serves. Waits until done; `tap-ctl stats` shows progress meanwhile'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand help; and not __fish_seen_subcommand_from vhd policy audit metrics cbt allocate free spawn attach detach open close create destroy pause unpause list stats throttle major snapshot coalesce help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand help; and __fish_seen_subcommand_from vhd" -f -a "create" -d 'Create a new image (dynamic unless --fixed)'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand help; and __fish_seen_subcommand_from vhd" -f -a "snapshot" -d 'Create a differencing child of PARENT'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand help; and __fish_seen_subcommand_from vhd" -f -a "query" -d 'Show what an image is'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand help; and __fish_seen_subcommand_from vhd" -f -a "check" -d 'Check consistency; exits non-zero and lists every problem found'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand help; and __fish_seen_subcommand_from vhd" -f -a "repair" -d 'Fix footers and batmaps; reports what is left'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand help; and __fish_seen_subcommand_from vhd" -f -a "read" -d 'Write LENGTH bytes at OFFSET of the virtual disk to stdout'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand help; and __fish_seen_subcommand_from vhd" -f -a "write" -d 'Write stdin (at most 64 MiB) into the virtual disk at OFFSET, all or nothing: the whole input is read and checked first, and a write that fails part-way puts the previous contents back'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand help; and __fish_seen_subcommand_from vhd" -f -a "convert" -d 'Convert SRC (raw or VHD: -f, or probed without guessing) into a new file DST'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand help; and __fish_seen_subcommand_from vhd" -f -a "coalesce" -d 'Merge a differencing image into its parent'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand help; and __fish_seen_subcommand_from vhd" -f -a "resize" -d 'Grow an image to SIZE MiB'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand help; and __fish_seen_subcommand_from vhd" -f -a "set-parent" -d 'Make NEWPARENT the parent of a differencing image'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand help; and __fish_seen_subcommand_from vhd" -f -a "key" -d 'Set (-s), check (-c) or print (-p) the keyhash of blktap\'s encrypted VHDs, or calculate one (-C), like `vhd-util key`'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand help; and __fish_seen_subcommand_from vhd" -f -a "confine-check" -d 'Confine as the image verbs do, then try to open PATH: shows that the parser can open nothing (exits 0 when the open is refused)'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand help; and __fish_seen_subcommand_from policy" -f -a "check" -d 'Validate a policy file; problems are printed as FILE:LINE:COL: message'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand help; and __fish_seen_subcommand_from audit" -f -a "verify" -d 'Check an audit log\'s hash chain; names the first broken line. Rotated files are given oldest first (`audit.jsonl.2 audit.jsonl.1 audit.jsonl`): each must continue the chain of the one before'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand help; and __fish_seen_subcommand_from cbt" -f -a "start" -d 'Start a new, empty bitmap NAME (file LEAF.NAME.cbt next to the image)'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand help; and __fish_seen_subcommand_from cbt" -f -a "checkpoint" -d 'Clear bitmap NAME: it holds the blocks written from now on'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand help; and __fish_seen_subcommand_from cbt" -f -a "stop" -d 'Stop tracking into NAME (its file is left for a last backup)'
complete -c tap-ctl -n "__fish_tap_ctl_using_subcommand help; and __fish_seen_subcommand_from cbt" -f -a "list" -d 'Print the disk\'s bitmaps: name, granularity, dirty blocks'
