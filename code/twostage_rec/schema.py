"""The shared column vocabulary of training and serving.

Training tables are pandas DataFrames with these column names; the artifact and the Feature
Store schema use the same names so one feature means one thing everywhere.
"""

from typing import Final

# Interaction table.
USER_ID: Final = "user_id"
ITEM_ID: Final = "item_id"
RATING: Final = "rating"
TIMESTAMP: Final = "timestamp"  # integer seconds since the epoch

INTERACTION_COLUMNS: Final = (USER_ID, ITEM_ID, RATING, TIMESTAMP)

# Item metadata table (item_id plus any of these; missing values are NaN).
CATEGORY: Final = "category"  # a single string label per item
PRICE: Final = "price"  # float, NaN when unknown
YEAR: Final = "year"  # release year, float, NaN when unknown
TITLE: Final = "title"

# Candidate sources (stage 1), by name: the manifest's ``sources`` keys and feature prefixes.
SOURCE_MF: Final = "mf"
SOURCE_NEIGHBOURS: Final = "item_neighbours"
SOURCE_SEQUENCE: Final = "sequence"
SOURCES: Final = (SOURCE_MF, SOURCE_NEIGHBOURS, SOURCE_SEQUENCE)

# Ranker features. The order of the manifest's ranker_features is authoritative at serving.
# Per source: its score for the candidate and the candidate's rank in its list (NaN when absent).
MF_SCORE: Final = "mf_score"
MF_RANK: Final = "mf_rank"
NEIGHBOURS_SCORE: Final = "item_neighbours_score"
NEIGHBOURS_RANK: Final = "item_neighbours_rank"
SEQUENCE_SCORE: Final = "sequence_score"
SEQUENCE_RANK: Final = "sequence_rank"
FUSION_SCORE: Final = "fusion_score"  # the stage-1 merge's score
SOURCE_FEATURES: Final = (
    MF_SCORE, MF_RANK, NEIGHBOURS_SCORE, NEIGHBOURS_RANK, SEQUENCE_SCORE, SEQUENCE_RANK, FUSION_SCORE,
)
# The candidate against the user's recent history (most recent 1, 5 and 20 items).
COOC_LAST_1: Final = "cooc_last_1"  # summed co-occurrence (neighbour) scores from those items
COOC_LAST_5: Final = "cooc_last_5"
COOC_LAST_20: Final = "cooc_last_20"
EMB_SIM_LAST_1: Final = "emb_sim_last_1"  # cosine to the mean of their item vectors
EMB_SIM_LAST_5: Final = "emb_sim_last_5"
EMB_SIM_LAST_20: Final = "emb_sim_last_20"
HOURS_SINCE_LAST: Final = "hours_since_last_interaction"
HISTORY_LENGTH: Final = "history_length"
CATEGORY_SHARE: Final = "history_category_share"  # share of the history in the candidate's category
HISTORY_FEATURES: Final = (
    COOC_LAST_1, COOC_LAST_5, COOC_LAST_20, EMB_SIM_LAST_1, EMB_SIM_LAST_5, EMB_SIM_LAST_20,
    HOURS_SINCE_LAST, HISTORY_LENGTH, CATEGORY_SHARE,
)
CANDIDATE_FEATURES: Final = (*SOURCE_FEATURES, *HISTORY_FEATURES)

USER_MEAN_RATING: Final = "user_mean_rating"
USER_RATING_COUNT: Final = "user_rating_count"
USER_DAYS_SINCE_FIRST: Final = "user_days_since_first"
ITEM_AVG_RATING: Final = "item_avg_rating"
ITEM_RATING_COUNT: Final = "item_rating_count"
ITEM_RECENT_COUNT: Final = "item_rating_count_30d"  # ratings in the 30 days before the query time
ITEM_WEEK_COUNT: Final = "item_rating_count_7d"  # ratings in the 7 days before the query time
ITEM_TREND: Final = "item_popularity_trend"  # daily rate of the last 7 days over that of the last 30
ITEM_DAYS_SINCE_FIRST: Final = "item_days_since_first"
ITEM_DAYS_SINCE_LAST: Final = "item_days_since_last"
CATEGORY_CODE: Final = "category_code"
