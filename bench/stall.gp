# Worst event-loop stall against dirty keys per interval (bench/run).
# gnuplot -e "datafile='stall.dat'; outfile='stall.png'" bench/stall.gp
set terminal pngcairo size 900,560 noenhanced font ",10"
set output outfile
set title "Event-loop stall during automatic sync: worst lateness of a 1 ms probe timer\nper sync interval (median over intervals), JIT on, 1 worker, sync_interval 0.5 s"
set xlabel "keys dirtied per sync interval"
set ylabel "worst stall (ms)"
set logscale y
set grid
set key outside bottom center horizontal maxrows 2
set bmargin 7
set format x "%.0s%c"
set xrange [0:*]
set arrow from graph 0, first 2 to graph 1, first 2 nohead dashtype 2 lc rgb "#888888"
set label "goal: 2 ms" at graph 0.01, first 2.4 textcolor rgb "#666666"
stats datafile using 0 nooutput
ncols = STATS_columns
plot for [i=2:ncols] datafile using 1:i with linespoints lw 2 pt 7 title columnheader(i)
